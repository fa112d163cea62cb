"""A cave's pages in a real process: two resident (the registry with the blocked-event
counters, read+write; the code, read+execute), never one both; and a cave of the
previous layout, left by the previous version in a process patched before an
upgrade, still used, repaired after a killed patcher, and unmapped once empty."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path

import pytest

from micropatch import live
from micropatch.live import commit, provision
from micropatch.live.cave import CAVE_SIZE, read_caves
from micropatch.live.mapped import CAVE_PREFIX
from micropatch.live.registry import LAYOUT, LAYOUT_V3, PAGE
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory

from .patching import assert_untouched, make_patch, patch_source
from .test_crash import FIX_A, FIX_B, _kill_at, _no_thread_stopped, _registry_agrees

GUARD = {"at": "copy_packet", "when": "esi > 64", "then": "blocked; return -1"}
BLOCKED_TWICE = ["-1", "-1", "10"]


def cave_pages(pid: int) -> list[tuple[str, int, int]]:
    """(permissions, offset in the cave, Rss in bytes) of each mapping of the cave."""
    pages, current = [], None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            current = (fields[1], int(fields[2], 16)) if CAVE_PREFIX in line else None
        elif current is not None and fields[0] == "Rss:":
            pages.append((*current, int(fields[1]) * 1024))
    return pages


def the_cave(pid: int):  # type: ignore[no-untyped-def]
    with Memory(pid, writable=False) as memory:
        [cave] = read_caves(memory, read_maps(pid))
    return cave


def test_a_cave_with_a_blocked_counter_keeps_8_kib_resident_and_w_xor_x(targets, start):
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [GUARD])
    live.apply(patch, t.pid)
    assert [t.cmd("call 65"), t.cmd("call 100"), t.cmd("call 10")] == BLOCKED_TWICE
    [state] = live.status(t.pid)
    assert state.blocked == 2
    pages = cave_pages(t.pid)
    # The registry's pages (counters at the first one's end) writable, then the code.
    assert [(perms, offset) for perms, offset, _ in pages] == [
        ("rw-p", 0),
        ("r-xp", LAYOUT.code_start),
    ]
    assert not [m for m in read_maps(t.pid) if "w" in m.perms and "x" in m.perms], "W^X"
    assert sum(rss for *_, rss in pages) <= 8 * 1024, pages
    [site] = the_cave(t.pid).registry.patches[0].sites
    cave = the_cave(t.pid).address
    assert cave + LAYOUT.counters[0] <= site.counter < cave + PAGE  # type: ignore[index]
    assert site.trampoline >= cave + LAYOUT.code_start
    live.remove(patch.id, t.pid)
    assert t.cmd("call 65") == "-2"
    assert cave_pages(t.pid) == []
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


@pytest.fixture
def old_layout(monkeypatch):  # type: ignore[no-untyped-def]
    """Caves made as the previous version made them (layout 3: registry and code
    read+execute, counters in the last page), until `undo` is called: the upgrade."""
    made = partial(commit.new_cave, layout=LAYOUT_V3)
    monkeypatch.setattr(provision, "new_cave", made)
    monkeypatch.setattr(commit, "new_cave", made)
    return monkeypatch.undo


def test_a_cave_of_the_previous_layout_is_used_after_an_upgrade(targets, start, old_layout):
    t = start("vuln_pie")
    first = make_patch(targets.vuln_pie, [GUARD], id="guard")
    live.apply(first, t.pid)
    old_layout()  # the upgrade: what follows runs as the current version
    assert [perms for perms, *_ in cave_pages(t.pid)] == ["r-xp", "rw-p"]
    cave = the_cave(t.pid)
    assert cave.registry.layout is LAYOUT_V3
    [site] = cave.registry.patches[0].sites
    assert site.counter >= cave.address + CAVE_SIZE - PAGE  # its last page
    assert [t.cmd("call 65"), t.cmd("call 100"), t.cmd("call 10")] == BLOCKED_TWICE
    [state] = live.status(t.pid)
    assert (state.patch_id, state.blocked) == ("guard", 2)
    # update, in the same cave and layout: a counter of the last page again, counting
    second = make_patch(targets.vuln_pie, [GUARD], id="guard", version=2)
    assert live.update(second, t.pid).action == "updated"
    cave = the_cave(t.pid)
    assert cave.registry.layout is LAYOUT_V3 and cave.registry.seq > 2
    [site] = cave.registry.patches[0].sites
    assert site.counter >= cave.address + CAVE_SIZE - PAGE
    assert [t.cmd("call 65"), t.cmd("call 10")] == ["-1", "10"]
    [state] = live.status(t.pid)
    assert (state.version, state.blocked) == (2, 1)
    live.remove("guard", t.pid)
    assert cave_pages(t.pid) == []
    assert t.cmd("call 65") == "-2"
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


@pytest.mark.parametrize("point", ["intent-recorded", "jump-0-written", "committed"])
def test_a_patcher_killed_in_a_cave_of_the_previous_layout(
    targets, start, tmp_path, old_layout, point
):
    """The current version, killed applying into an old cave: repair reads and repairs
    it in its own layout, and the next commands work on it."""
    t = start("twofuncs")
    live.apply(make_patch(targets.twofuncs, [FIX_A], id="fix-a"), t.pid)
    old_layout()
    source = tmp_path / "b.toml"
    source.write_text(patch_source(targets.twofuncs, [FIX_B], id="fix-b"))
    assert _kill_at(point, "apply", t.pid, str(source)) == -signal.SIGKILL
    _no_thread_stopped(t.pid)
    _registry_agrees(t.pid)
    live.repair(t.pid)
    assert the_cave(t.pid).registry.layout is LAYOUT_V3
    ids = {s.patch_id for s in live.status(t.pid)}
    assert ids in ({"fix-a"}, {"fix-a", "fix-b"})
    assert all(s.state == "applied" for s in live.status(t.pid))
    for patch_id in ids:
        live.remove(patch_id, t.pid)
    assert cave_pages(t.pid) == []
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])
