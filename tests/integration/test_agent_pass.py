"""A reconcile pass in-process over real targets: what it does once per pass, not
once per process (issue 18 item 4). The signatures of a stored patch are checked
once (agent/verified.py); what a process carries after the pass's operations comes
from their outcomes, its registries not read again (agent/known.py), and the blocked
counters it keeps that way are the ones the registry records."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from micropatch import live
from micropatch.agent.config import AgentConfig
from micropatch.agent.paths import AgentPaths
from micropatch.agent.service import Agent
from micropatch.build.artifact import build
from micropatch.trust.keys import generate_key, write_key_pair

from .patching import assert_untouched, patch_source

GUARD = {"at": "copy_packet", "when": "esi > 64", "then": "blocked; return -1"}


@pytest.fixture
def agent(tmp_path, targets) -> Iterator[Agent]:
    paths = AgentPaths(tmp_path / "state", tmp_path / "agent.sock", tmp_path / "trusted")
    a = Agent(AgentConfig(workers=2), paths, stream=io.StringIO())
    key = generate_key("dev", expires_days=30)
    paths.trust_dir.mkdir()
    write_key_pair(key, tmp_path / "dev")
    shutil.copy(tmp_path / "dev.pub", paths.trust_dir / "dev.pub")
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [GUARD], id="fix"))
    a.add(build(source, targets.vuln_pie).signed(key).to_bytes(), "fix.mpatch", "disabled")
    yield a
    a.close()


def test_a_pass_checks_once_and_knows_what_it_applied_without_reading_again(
    agent, targets, start, monkeypatch
):
    ts = [start("vuln_pie") for _ in range(4)]
    pids = [t.pid for t in ts]
    calls: dict[str, list[Any]] = {"recheck": [], "status": []}
    recheck, status = agent.store.recheck, live.status

    def counted(name: str, real: Any) -> Any:
        return lambda arg: calls[name].append(arg) or real(arg)

    monkeypatch.setattr(agent.store, "recheck", counted("recheck", recheck))
    monkeypatch.setattr(live, "status", counted("status", status))
    agent.set_enabled("fix", True)
    result = agent.reconciler.run_pass(pids)
    assert (result.applied, result.failed) == (4, 0)
    assert calls == {"recheck": ["fix"], "status": []}  # once a pass; no registry read
    for t in ts:
        [state] = status(t.pid)
        covered = agent.reconciler.get(t.pid)
        assert covered is not None and covered.patches == {"fix": 1}
        assert covered.counters == {"fix": state.counters} and state.counters
        assert covered.blocked == {"fix": 0}
        assert t.cmd("call 64") == "64"  # allowed: nothing blocked
    # The counters kept from the outcome are the ones the patchlet counts in.
    assert ts[0].cmd("call 65") == "-1"
    agent.reconciler.poll_blocked()
    [blocked] = [e for e in agent.events.query() if e.kind == "blocked"]
    assert (blocked.pid, blocked.data) == (pids[0], {"count": 1, "total": 1})
    # Nothing to do: each registry read once (the truth), the signatures not checked.
    calls["status"].clear()
    again = agent.reconciler.run_pass(pids)
    assert (again.applied, again.removed) == (0, 0) and calls["recheck"] == ["fix"]
    assert sorted(calls["status"]) == sorted(pids)
    # Removed: known from the outcomes too; the processes as they were.
    calls["status"].clear()
    agent.set_enabled("fix", False)
    gone = agent.reconciler.run_pass(pids)
    assert gone.removed == 4 and sorted(calls["status"]) == sorted(pids)  # the reads before
    for t in ts:
        assert agent.reconciler.get(t.pid) is None
        assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
