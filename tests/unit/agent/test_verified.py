"""agent/verified.py: a pass checks each stored patch's signatures once, not once
per process; the next pass checks again (a withdrawn key rejects it there)."""

from __future__ import annotations

import shutil
import threading

from micropatch.agent.verified import PassVerified
from unit.agent.test_store import setup  # noqa: F401  (the store fixture)


def test_one_check_per_pass_shared_by_every_process(setup, monkeypatch):  # noqa: F811
    store, _events, artifact, _paths = setup
    store.add(artifact(1), "fix-1.mpatch")
    checks: list[str] = []
    real = store.recheck
    monkeypatch.setattr(store, "recheck", lambda pid: checks.append(pid) or real(pid))
    verified = PassVerified(store)
    workers = [
        threading.Thread(target=lambda: [verified.admitted("fix") for _ in range(50)])
        for _ in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    admitted = verified.admitted("fix")
    assert admitted is not None and admitted.id == "fix"
    assert checks == ["fix"]  # 201 processes, one verification
    assert PassVerified(store).admitted("fix") is not None and checks == ["fix", "fix"]


def test_a_key_withdrawn_rejects_at_the_next_pass_once(setup):  # noqa: F811
    store, events, artifact, paths = setup
    store.add(artifact(1), "fix-1.mpatch")
    before = PassVerified(store)
    assert before.admitted("fix") is not None
    shutil.move(paths.trust_dir / "dev.pub", paths.state_dir / "dev.pub")  # key withdrawn
    after = PassVerified(store)
    assert after.admitted("fix") is None
    assert after.admitted("fix") is None  # the same answer, not a second rejection
    assert [e.kind for e in events] == ["rejected"]
    assert store.patches() == {} and len(list(paths.rejected.iterdir())) == 1
