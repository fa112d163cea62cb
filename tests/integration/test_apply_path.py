"""The path of one apply to a process without a cave: the patcher's thread real-time
once for the whole operation, not once per stop; after the cave is provisioned only
the registries are read again (`live.prepare.provided`), to the decision a full
reading makes."""

from __future__ import annotations

import os

import pytest

from micropatch import live
from micropatch.build.artifact import build
from micropatch.live.decide import Change
from micropatch.live.engine import _plan
from micropatch.live.lock import queued
from micropatch.live.mapped import ModuleCache
from micropatch.live.prepare import prepare, provided
from micropatch.live.provision import provision, unprovision
from micropatch.process.maps import read_maps
from micropatch.process.priority import realtime_refused
from micropatch.trust.admission import Admitted, admit

from .patching import assert_untouched, patch_source

GUARD = {"at": "copy_packet", "when": "esi > 64", "then": "return -1"}


def recorded(targets, tmp_path) -> Admitted:
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [GUARD]))
    data = build(source, targets.vuln_pie).to_bytes()
    return admit(data, name="fix.mpatch", keys=None, allow_unsigned=True)


def test_the_thread_is_real_time_once_for_both_stops_of_an_apply(
    targets, start, tmp_path, monkeypatch
):
    """One thread borrowed to map the cave, then every thread stopped: two stops, one
    raise to SCHED_FIFO and one return, around both (a drop in between gives the CPU
    away on a loaded machine). Before the change: two raises and two returns."""
    refused = realtime_refused()
    if refused is not None:
        pytest.skip(f"SCHED_FIFO not permitted here: {refused}")
    admitted = recorded(targets, tmp_path)
    t = start("vuln_pie")
    before = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
    if before in (os.SCHED_FIFO, os.SCHED_RR):
        pytest.skip("the tests run real-time already: nothing to raise")
    policies: list[int] = []
    real = os.sched_setscheduler

    def spy(pid: int, policy: int, param: os.sched_param) -> None:
        policies.append(policy & ~os.SCHED_RESET_ON_FORK)
        real(pid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", spy)
    outcome = live.apply(admitted, t.pid)
    monkeypatch.undo()
    assert outcome.borrowed > 0, "no cave was provisioned: one stop only"
    assert policies == [os.SCHED_FIFO, before]
    assert (t.cmd("call 65"), t.cmd("call 64")) == ("-1", "64")
    live.remove(admitted.id, t.pid)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_after_provisioning_the_registries_alone_decide_as_a_full_reading(targets, start, tmp_path):
    admitted = recorded(targets, tmp_path)
    t = start("vuln_pie")
    cache = ModuleCache()
    change = Change(t.pid, admitted, None, cache)
    module, planned = _plan(t.pid, read_maps(t.pid), admitted, cache)
    with queued(t.pid):
        first = prepare(change, module, planned)
        assert first.needs_cave and first.commit is None
        address, _ = provision(t.pid, module)
        try:
            quick = provided(change, module, planned, first, address)
            full = prepare(change, module, planned)
        finally:
            unprovision(t.pid, address)
    assert quick.commit is not None and full.commit is not None
    assert [c.address for c in quick.caves] == [c.address for c in full.caves] == [address]
    assert quick.heads == full.heads
    assert quick.stub == full.stub
    assert quick.commit.trampolines == full.commit.trampolines
    assert [c.address for c in quick.commit.checks] == [c.address for c in full.commit.checks]
    assert not any(m.start == address for m in read_maps(t.pid)), "the cave stayed mapped"
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_something_else_where_the_cave_should_be_leaves_the_decision_to_the_stop(
    targets, start, tmp_path
):
    """Bytes that are no registry where the provisioned cave should be (here the
    module's ELF header) are not trusted: no decision is made before the stop, which
    reads the whole process again."""
    admitted = recorded(targets, tmp_path)
    t = start("vuln_pie")
    cache = ModuleCache()
    change = Change(t.pid, admitted, None, cache)
    module, planned = _plan(t.pid, read_maps(t.pid), admitted, cache)
    with queued(t.pid):
        first = prepare(change, module, planned)
        again = provided(change, module, planned, first, module.base)
    assert again.commit is None and again.caves == [] and not again.needs_cave
    assert again.stub == first.stub
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
