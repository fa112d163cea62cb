"""`micropatch repair --all` in a sandbox (its own PID namespace: it sees only the
processes started there, never the host's): it stops only the processes a look
without a stop cannot tell settled, says what it repaired, process by process, and
sums up, instead of a line for every patched process."""

from __future__ import annotations

import os
import shutil

from micropatch import faults
from micropatch.live.recovery import settled

from .agentproc import FIX, NEEDS, applied, box, keys, nstart, signed  # noqa: F401 (fixtures)

pytestmark = NEEDS


def test_repair_all_says_what_it_repaired_and_sums_up(targets, box, nstart, tmp_path, keys):  # noqa: F811
    clean, killed = nstart("vuln_pie"), nstart("vuln_pie")
    artifact = signed(tmp_path, targets.vuln_pie, [FIX], keys)
    pub = keys.with_suffix(".pub")
    micropatch = shutil.which("micropatch") or "micropatch"
    env = {**os.environ, "MICROPATCH_NO_AGENT": "1"}

    def inside(*args: object, extra: dict[str, str] | None = None):
        return box.run(micropatch, *map(str, args), env={**env, **(extra or {})}, timeout=120)

    done = inside("apply", artifact, "--pid", clean.ns_pid, "--trust", pub)
    assert done.returncode == 0, done.stderr
    # A patcher killed with the change recorded as in progress: repair completes it.
    at = faults.environment("intent-recorded")
    done = inside("apply", artifact, "--pid", killed.ns_pid, "--trust", pub, extra=at)
    assert done.returncode != 0
    # Told without a stop: the clean one is settled (repair --all leaves it running).
    assert settled(clean.pid) and not settled(killed.pid)
    done = inside("repair", "--all")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "repair: 2 patched processes, 1 to look at, 1 repaired, 0 failed"
    assert all(line.startswith(f"pid {killed.ns_pid}: ") for line in lines[:-1]), done.stdout
    assert f"pid {clean.ns_pid}" not in done.stdout
    assert applied(clean.pid) == applied(killed.pid) == [("agent-fix", 1)]
    assert settled(killed.pid)
    assert (clean.cmd("call 65"), killed.cmd("call 65")) == ("-1", "-1")
    # --pid says it of the one process named.
    done = inside("repair", "--pid", clean.ns_pid)
    assert done.stdout == f"pid {clean.ns_pid}: nothing to repair\n", done.stdout
