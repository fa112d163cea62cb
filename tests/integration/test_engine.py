"""The live engine on real processes: behaviour before, with and after each patch."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from micropatch import live
from micropatch.process.maps import read_maps

from .agentproc import NEEDS
from .patching import assert_untouched, make_patch

# copy_packet: `call 65` answers -2 ("would have overflowed"); the fix makes it -1.
FIX_AT_ENTRY = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}


@pytest.mark.parametrize("name", ["vuln_pie", "vuln_nopie", "vuln_lib_main"])
def test_apply_remove_pie_nopie_shared(targets, start, name):
    module = targets.libvuln if name == "vuln_lib_main" else targets.path(name)
    t = start(name)
    patch = make_patch(module, [FIX_AT_ENTRY])
    assert (t.cmd("call 65"), t.cmd("call 10")) == ("-2", "10")

    outcome = live.apply(patch, t.pid)
    assert outcome.action == "applied" and outcome.sites == 1
    assert (t.cmd("call 65"), t.cmd("call 10"), t.cmd("call -3")) == ("-1", "10", "-1")
    [state] = live.status(t.pid)
    assert (state.patch_id, state.version, state.module) == ("test-fix", 1, str(module.resolve()))
    cave = [m for m in read_maps(t.pid) if "micropatch" in m.path]
    # The registry's pages (with the blocked counters) read+write; the code read+execute.
    assert [m.perms for m in cave] == ["rw-p", "r-xp"], cave
    assert not [m for m in read_maps(t.pid) if "w" in m.perms and "x" in m.perms], "W^X"

    live.remove("test-fix", t.pid)
    assert (t.cmd("call 65"), t.cmd("call 10")) == ("-2", "10")
    assert_untouched(targets, name, t.pid, ["copy_packet"], module)


def test_fix_mid_function_jumps_to_error_path(targets, start):
    """The upstream-style fix: at the bound check, jump to the existing `return -1`."""
    t = start("vuln_pie")
    patch = make_patch(
        targets.vuln_pie, [{"at": "copy_packet+0x8", "code": "cmp esi, 64\njg {copy_packet+0xb6}"}]
    )
    live.apply(patch, t.pid)
    assert (t.cmd("call 65"), t.cmd("call 64"), t.cmd("call 0")) == ("-1", "64", "0")
    live.remove(patch.id, t.pid)
    assert t.cmd("call 65") == "-2"


def test_resume_elsewhere(targets, start):
    """`resume` sends execution to another module offset instead of after the site."""
    t = start("vuln_pie")
    patch = make_patch(
        targets.vuln_pie, [{"at": "copy_packet", "code": "", "resume": "copy_packet+0xb6"}]
    )
    live.apply(patch, t.pid)
    assert t.cmd("call 10") == "-1"
    live.remove(patch.id, t.pid)
    assert t.cmd("call 10") == "10"


def _stats(t):
    words = t.cmd("stats").split()
    return dict(zip(words[::2], map(int, words[1::2]), strict=True))


def test_16_threads_apply_remove_100_times(targets, start):
    t = start("threads", "16")
    patch = make_patch(targets.threads, [{"at": "compute", "code": "add edi, 1"}])
    for _ in range(100):
        live.apply(patch, t.pid, retries=200)
        live.remove(patch.id, t.pid, retries=200)
    t.cmd("sync")
    stats = _stats(t)
    assert stats["bad"] == 0, stats
    assert stats["calls"] > 0 and t.alive()
    # Patched results were seen: every call returned the old or the new value.
    live.apply(patch, t.pid, retries=200)
    t.cmd("sync")
    before = _stats(t)
    t.cmd("sync")
    after = _stats(t)
    assert after["new"] > before["new"] and after["old"] == before["old"] and after["bad"] == 0
    assert_no_crash(t)


def assert_no_crash(t):
    assert t.alive(), t.stderr_text()
    assert t.cmd("quit") == "bye"


@pytest.mark.parametrize(
    ("offset", "code", "expected"),
    [
        # Two pushes below a leaf's red zone would clobber a[0..1] without the skip.
        ("0x7a", "push rax\npush rax\npop rax\npop rax", lambda n: 14 * n + 91),
        # A call into code that uses the stack, from the middle of the leaf.
        (
            "0xdf",
            "push rcx\npush rax\ncall helper\npop rax\npop rcx\nadd rax, 1000\njmp done\nhelper:\npush rbx\npush rbx\npop rbx\npop rbx\nret\ndone:",
            lambda n: 14 * n + 1091,
        ),
        # A direct call out of the body (it returns): rax += rz_sum(2000000), whose
        # own pass through the site (rdi = n + 13 there) skips the call.
        (
            "0xdf",
            "cmp rdi, 1000000\njae done\npush rcx\npush rax\nmov edi, 2000000\ncall {rz_sum}\n"
            "mov rcx, rax\npop rax\nadd rax, rcx\npop rcx\ndone:",
            lambda n: 14 * n + 91 + 14 * 2000000 + 91,
        ),
    ],
)
def test_red_zone_leaf_with_pushes_and_calls(targets, start, offset, code, expected):
    t = start("redzone")
    patch = make_patch(targets.redzone, [{"at": f"rz_sum+{offset}", "code": code}])
    live.apply(patch, t.pid)
    for n in (0, 5, 1000):
        assert t.cmd(f"call {n}") == str(expected(n))
    live.remove(patch.id, t.pid)
    assert t.cmd("call 5") == str(14 * 5 + 91)


@pytest.mark.parametrize(
    ("function", "at", "code", "cases"),
    [
        # RIP-relative load + short je + call, all displaced in one 13-byte site
        (
            "reloc_fn",
            "reloc_fn",
            "add edi, 1",
            {41: "-42", 42: str(3 * 43 + 1007), 5: str(3 * 6 + 1007)},
        ),
        ("reloc_rip_imm", "reloc_rip_imm", "add edi, 1", {5: str(6 + 2000)}),
        ("reloc_jcc", "reloc_jcc+2", "lea edi, [rdi+1]", {0: "-100", 3: str(5 * 4)}),
        ("reloc_call", "reloc_call", "add edi, 1", {4: str(3 * 5 + 7)}),
        ("reloc_jrcxz", "reloc_jrcxz", "add edi, 1", {0: str(1 + 5), 7: str(8 + 5)}),
        ("reloc_loop", "reloc_loop", "add edi, 1", {0: "-6", 4: str(5 + 6)}),
    ],
)
def test_relocated_displaced_instructions(targets, start, function, at, code, cases):
    t = start("reloc")
    patch = make_patch(targets.reloc, [{"at": at, "code": code}])
    live.apply(patch, t.pid)
    for n, want in cases.items():
        assert t.cmd(f"{function} {n}") == want, (function, n)
    live.remove(patch.id, t.pid)
    assert_untouched(targets, "reloc", t.pid, [function])


def test_reloc_fn_site_covers_rip_load_jcc_and_call(targets):
    """The 13-byte site at reloc_fn holds all three kinds the issue names."""
    from micropatch.arch.x86_64.decode import decode, format_instruction

    code = targets.code("reloc", "reloc_fn", 13)
    texts = [format_instruction(i) for i in decode(code, 0)]
    assert "rip" in texts[0] and texts[1].startswith("je") and texts[2].startswith("call")


def test_thread_blocked_in_read_completes(targets, start):
    t = start("blocker")
    state = t.cmd("state")
    assert state.endswith("syscall 0"), state  # the reader thread sits in read()
    patch = make_patch(targets.blocker, [FIX_AT_ENTRY])
    live.apply(patch, t.pid)
    assert t.cmd("feed hello-after-patch") == "read hello-after-patch"
    assert t.cmd("call 65") == "-1"
    live.remove(patch.id, t.pid)
    assert t.cmd("feed again") == "read again"


def test_forked_child_is_still_patched(targets, start):
    t = start("forker")
    patch = make_patch(targets.forker, [FIX_AT_ENTRY])
    live.apply(patch, t.pid)
    assert t.cmd("fork 65") == "child -1"
    assert t.cmd("fork 10") == "child 10"
    live.remove(patch.id, t.pid)
    assert t.cmd("fork 65") == "child -2"


def test_two_patchlets_atomically(targets, start):
    t = start("twofuncs")
    patch = make_patch(
        targets.twofuncs,
        [{"at": "check_a", "code": "add edi, 1"}, {"at": "check_b", "code": "add edi, 1"}],
    )
    live.apply(patch, t.pid)
    assert (t.cmd("a 5"), t.cmd("b 5")) == ("1006", str(7 * 6 - 3))
    [state] = live.status(t.pid)
    assert len(state.sites) == 2
    live.remove(patch.id, t.pid)
    assert (t.cmd("a 5"), t.cmd("b 5")) == ("1005", str(7 * 5 - 3))


def test_second_patchlet_invalid_is_refused_at_plan_time(targets, start):
    """The error is found while planning, before the process is stopped: nothing is
    written, so there is nothing to roll back (test_rollback.py covers rollback)."""
    from micropatch.errors import NotInstructionBoundary

    t = start("twofuncs")
    patch = make_patch(
        targets.twofuncs,
        [{"at": "check_a", "code": "add edi, 1"}, {"at": "check_b+0x1", "code": "add edi, 1"}],
    )
    with pytest.raises(NotInstructionBoundary, match=r"patchlet\[1\]"):
        live.apply(patch, t.pid)
    assert (t.cmd("a 5"), t.cmd("b 5")) == ("1005", str(7 * 5 - 3))
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


def test_update_v1_to_v2(targets, start):
    t = start("twofuncs")
    v1 = make_patch(targets.twofuncs, [{"at": "check_a", "code": "add edi, 1"}], version=1)
    v2 = make_patch(
        targets.twofuncs,
        [{"at": "check_a", "code": "add edi, 2"}, {"at": "check_b", "code": "add edi, 2"}],
        version=2,
    )
    live.apply(v1, t.pid)
    assert t.cmd("a 5") == "1006"
    outcome = live.update(v2, t.pid)
    assert outcome.action == "updated" and outcome.version == 2
    assert (t.cmd("a 5"), t.cmd("b 5")) == ("1007", str(7 * 7 - 3))
    [state] = live.status(t.pid)
    assert (state.version, len(state.sites)) == (2, 2)
    live.remove(v2.id, t.pid)
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


def test_two_patches_share_a_cave_and_leave_nothing(targets, start):
    t = start("twofuncs")
    a = make_patch(targets.twofuncs, [{"at": "check_a", "code": "add edi, 1"}], id="fix-a")
    b = make_patch(targets.twofuncs, [{"at": "check_b", "code": "add edi, 1"}], id="fix-b")
    live.apply(a, t.pid)
    live.apply(b, t.pid)
    assert {s.patch_id for s in live.status(t.pid)} == {"fix-a", "fix-b"}
    assert len([m for m in read_maps(t.pid) if "micropatch" in m.path and m.executable]) == 1
    live.remove("fix-a", t.pid)
    assert t.cmd("a 5") == "1005" and t.cmd("b 5") == str(7 * 6 - 3)
    live.remove("fix-b", t.pid)
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


def test_workers_inside_the_site_are_moved_not_waited_for(targets, start):
    """Workers spend most time inside `hot`'s site (at its pauses, whole instructions of
    a site with a relocated copy): the engine moves them to the copy on apply instead
    of waiting. Over 21 applies with 4 workers, some stop must find a worker there (one
    stop in 20 finds none, spinner.c); without the moves, a worker would resume in the
    middle of the jump. Removal moves nobody: a worker in a copy finishes it there (the
    trampoline is retired, not freed) and returns to the restored code."""
    t = start("spinner", "4")
    patch = make_patch(targets.spinner, [{"at": "hot", "code": "add edi, 1"}])
    outcomes = []
    for _ in range(21):
        outcomes.append(live.apply(patch, t.pid, retries=500))
        if len(outcomes) == 1:
            assert t.cmd("call 5") == str(3 * 5 + 4)
        outcomes.append(live.remove(patch.id, t.pid, retries=500))
    assert sum(o.moved for o in outcomes[::2]) > 0, outcomes  # applies: into the copy
    assert sum(o.moved for o in outcomes[1::2]) == 0, outcomes  # removes: nobody moved
    t.cmd("sync")
    stats = _stats(t)
    assert stats["bad"] == 0 and stats["new"] > 0, stats
    assert_no_crash(t)


def test_retries_while_a_thread_sits_in_the_site(targets, start, monkeypatch):
    """A thread blocked in stuck_read sits inside a site that has no relocated copy
    (`resume` elsewhere): the first attempt must give up, resume the process and wait;
    the thread leaves during that wait (we unstick it from the engine's retry delay,
    not with a sleep), and the second attempt applies the patch."""
    from types import SimpleNamespace

    from micropatch.live import engine

    t = start("spinner", "1")
    assert t.cmd("park") == "parked 1"
    assert t.cmd("stick").startswith("stuck")
    waits = []

    def wait_then_unstick(seconds):
        waits.append(seconds)
        if len(waits) == 1:
            assert t.cmd("unstick") == "unstuck 1"

    monkeypatch.setattr(engine, "time", SimpleNamespace(sleep=wait_then_unstick, time=time.time))
    patch = make_patch(targets.spinner, [{"at": "stuck_read", "code": "nop", "resume": "hot"}])
    outcome = live.apply(patch, t.pid, retries=5)
    assert (outcome.attempts, len(waits), outcome.moved) == (2, 1, 0)
    assert [s.patch_id for s in live.status(t.pid)] == [patch.id]
    live.remove(patch.id, t.pid)
    assert t.cmd("stick").startswith("stuck") and t.cmd("unstick") == "unstuck 1"
    assert_untouched(targets, "spinner", t.pid, ["stuck_read", "hot"])
    assert_no_crash(t)


def test_status_of_unpatched_process(start):
    t = start("vuln_pie")
    assert live.status(t.pid) == []


def test_status_read_while_a_patch_is_removed_reads_again(targets, start, monkeypatch):
    """`status` does not stop the process: a patch removed between its reading the maps
    and the cave (the cave unmapped: EIO) is read again, not an error."""
    from micropatch.errors import MemoryAccessError
    from micropatch.live import states

    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [FIX_AT_ENTRY])
    live.apply(patch, t.pid)
    real, calls = states.read_caves, []

    def racing(memory, mappings):  # the first read meets a cave unmapped meanwhile
        calls.append(1)
        if len(calls) == 1:
            raise MemoryAccessError(f"process {t.pid}: cannot read 28 bytes: Input/output error")
        return real(memory, mappings)

    monkeypatch.setattr(states, "read_caves", racing)
    assert [s.patch_id for s in live.status(t.pid)] == [patch.id] and len(calls) == 2
    live.remove(patch.id, t.pid)


def test_detached_target_survives_sigterm(targets, start):
    """After apply/remove the target is a normal process again: signals work as before."""
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [FIX_AT_ENTRY])
    live.apply(patch, t.pid)
    with open(f"/proc/{t.pid}/status") as f:
        status = f.read()
    assert "TracerPid:\t0" in status
    os.kill(t.pid, signal.SIGTERM)
    assert t.proc.wait(timeout=5) == -signal.SIGTERM


def test_cli_round_trip(targets, start, tmp_path):
    from .patching import patch_source

    t = start("vuln_pie")
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX_AT_ENTRY]))
    run = lambda *a: subprocess.run(["micropatch", *a], capture_output=True, text=True)  # noqa: E731
    assert run("keys", "generate", str(tmp_path / "dev")).returncode == 0
    built = run("build", str(source), "--module", str(targets.vuln_pie), "--key", str(tmp_path / "dev.key"), "-o", str(tmp_path / "fix.mpatch"))  # fmt: skip
    assert built.returncode == 0, built.stderr
    trust = ("--trust", str(tmp_path / "dev.pub"))
    applied = run("apply", str(tmp_path / "fix.mpatch"), "--pid", str(t.pid), *trust)
    assert applied.returncode == 0, applied.stderr
    assert "applied test-fix v1" in applied.stdout
    assert t.cmd("call 65") == "-1"
    shown = run("status", "--pid", str(t.pid))
    assert "test-fix" in shown.stdout and shown.returncode == 0
    removed = run("remove", "test-fix", "--pid", str(t.pid))
    assert removed.returncode == 0, removed.stderr
    assert t.cmd("call 65") == "-2"


def test_thousands_of_threads(targets, start):
    t = start("threads", "2000", "2", "idle")
    assert int(t.cmd("tids").split()[-1]) >= 2000
    patch = make_patch(targets.threads, [{"at": "compute", "code": "add edi, 1"}])
    outcome = live.apply(patch, t.pid)
    assert t.cmd("call 5") == str(2 * 6 + 1)
    live.remove(patch.id, t.pid)
    assert t.cmd("call 5") == str(2 * 5 + 1)
    assert outcome.paused < 10


@NEEDS
def test_cli_all_processes(targets, box, nstart, tmp_path):
    """`--all` without a filter, run in a sandbox (its own PID namespace): it meets
    every process there, and no other test's nor the host's. (Run on the host, it
    patched other tests' vuln_pie, e.g. test_fleet_e2e's hosts, and its `remove
    fleet-fix --all` removed the fleet's patch of the same id from them.)"""
    from .patching import patch_source

    many = [nstart("vuln_pie") for _ in range(3)]
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX_AT_ENTRY], id="all-fix"))
    inside = {**os.environ, "MICROPATCH_TRUST_DIR": str(tmp_path)}  # holds fleet.pub

    def run(*a):
        return box.run("micropatch", *a, timeout=120, env=inside)

    assert run("keys", "generate", tmp_path / "fleet").returncode == 0
    artifact = tmp_path / "all-fix.mpatch"
    built = run("build", source, "--module", targets.vuln_pie, "--key", tmp_path / "fleet.key", "-o", artifact)  # fmt: skip
    assert built.returncode == 0, built.stderr
    applied = run("apply", artifact, "--all")
    assert applied.returncode == 0, applied.stderr
    assert "apply: 3 done, 0 failed" in applied.stdout
    assert all(t.cmd("call 65") == "-1" for t in many)
    shown = run("status").stdout.splitlines()
    assert sorted(int(line.split("\t")[0]) for line in shown[1:]) == sorted(t.ns_pid for t in many)
    removed = run("remove", "all-fix", "--all")
    assert removed.returncode == 0, removed.stderr
    assert all(t.cmd("call 65") == "-2" for t in many)
    nothing = run("apply", artifact, "--trust", tmp_path / "fleet.pub")
    assert nothing.returncode == 1 and "--pid PID" in nothing.stderr


def test_thread_in_a_restartable_syscall_inside_the_site_is_moved(targets, start):
    """stuck_read is `xor eax,eax; syscall; ret`, and a thread is blocked in its read():
    the kernel will restart the syscall in the site. Apply moves the thread to the
    relocated copy (the syscall restarts there); remove leaves it there, in a retired
    trampoline that stays mapped until it leaves; the read completes normally either
    way, and the next operation frees what nobody uses any more."""
    t = start("spinner", "1")
    t.cmd("park")
    assert t.cmd("stick").startswith("stuck")
    patch = make_patch(targets.spinner, [{"at": "stuck_read", "code": "nop"}])
    applied = live.apply(patch, t.pid)
    assert (applied.attempts, applied.moved) == (1, 1)
    # the thread is still blocked, now in the trampoline copy: it stays there
    assert live.remove(patch.id, t.pid).moved == 0
    assert live.status(t.pid) == []
    assert [m for m in read_maps(t.pid) if "micropatch" in m.path], "retired, not freed"
    assert t.cmd("unstick") == "unstuck 1"
    assert t.cmd("stick").startswith("stuck")
    live.apply(patch, t.pid)
    assert t.cmd("unstick") == "unstuck 1"  # the read completes in the relocated copy
    live.remove(patch.id, t.pid)
    assert_untouched(targets, "spinner", t.pid, ["stuck_read", "hot"])
    assert_no_crash(t)


def test_reference_to_another_modules_function(targets, start):
    """`{libc.so.6!labs}` is resolved in the target process at apply time: the patchlet
    makes the length positive with libc's labs() before copy_packet checks it."""
    t = start("vuln_pie")
    code = "push rdi\nmovsxd rdi, esi\nmov rax, {libc.so.6!labs}\ncall rax\nmov esi, eax\npop rdi"
    patch = make_patch(targets.vuln_pie, [{"at": "copy_packet", "code": code}])
    assert t.cmd("call -3") == "-1"
    live.apply(patch, t.pid)
    assert (t.cmd("call -3"), t.cmd("call 10"), t.cmd("call -65")) == ("3", "10", "-2")
    live.remove(patch.id, t.pid)
    assert t.cmd("call -3") == "-1"
