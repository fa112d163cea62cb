"""Bad input of every kind: a specific, clear error, and an untouched, running target."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from micropatch import live
from micropatch.errors import (
    AlreadyApplied,
    AlreadyTraced,
    BranchIntoSite,
    ModuleMismatch,
    ModuleNotLoaded,
    NotApplied,
    NotInstructionBoundary,
    OriginalBytesMismatch,
    ProcessExited,
    ProcessNotFound,
    RemoteSyscallError,
    UnsafeToPatch,
)

from .patching import assert_untouched, make_patch, patch_source

FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
# stuck_read's site with `resume` elsewhere has no relocated copy: a thread stopped
# inside it cannot be moved, only waited for.
UNMOVABLE = {"at": "stuck_read", "code": "nop", "resume": "hot"}


def still_works(t, calls=(("call 65", "-2"), ("call 10", "10"))):
    for line, want in calls:
        assert t.cmd(line) == want


def test_pid_that_does_not_exist(targets):
    patch = make_patch(targets.vuln_pie, [FIX])
    with pytest.raises(ProcessNotFound, match=r"no process with pid 999999999"):
        live.apply(patch, 999_999_999)


def test_process_exits_during_the_operation(targets, start):
    """A thread parked inside a site that has no relocated copy keeps the engine retrying;
    the process dies meanwhile."""
    t = start("spinner", "1")
    assert t.cmd("stick").startswith("stuck")
    patch = make_patch(targets.spinner, [UNMOVABLE])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            live.apply(patch, t.pid, retries=100_000)
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.3)  # let it go through a few unsafe attempts
    t.kill()
    worker.join(timeout=30)
    assert not worker.is_alive()
    [error] = errors
    assert isinstance(error, ProcessExited), repr(error)
    assert f"process {t.pid}" in str(error)


def test_thread_always_inside_the_site_gives_up_cleanly(targets, start):
    t = start("spinner", "1")
    t.cmd("stick")
    patch = make_patch(targets.spinner, [UNMOVABLE])
    with pytest.raises(
        UnsafeToPatch, match=r"not safe after 4 attempts: thread \d+ is executing inside"
    ):
        live.apply(patch, t.pid, retries=3)
    assert t.cmd("unstick") == "unstuck 1"
    assert_untouched(targets, "spinner", t.pid, ["stuck_read", "hot"])


def test_resume_inside_a_site_is_refused(targets, start):
    from micropatch.errors import SiteError

    t = start("vuln_pie")
    patch = make_patch(
        targets.vuln_pie, [{"at": "copy_packet", "code": "", "resume": "copy_packet+0x2"}]
    )
    with pytest.raises(SiteError, match=r"resume.*inside the site"):
        live.apply(patch, t.pid)
    still_works(t)


def test_process_already_traced(targets, start):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    t = start("vuln_pie")
    tracer = subprocess.Popen(["strace", "-qq", "-o", "/dev/null", "-p", str(t.pid)])
    try:
        deadline = time.monotonic() + 10
        while "TracerPid:\t0" in Path(f"/proc/{t.pid}/status").read_text():
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.01)
        patch = make_patch(targets.vuln_pie, [FIX])
        with pytest.raises(AlreadyTraced, match=rf"already traced by pid {tracer.pid} \(strace\)"):
            live.apply(patch, t.pid)
    finally:
        tracer.terminate()
        tracer.wait()
    still_works(t)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_module_with_another_build_id(targets, start):
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [FIX], build="00" * 20)
    with pytest.raises(
        ModuleMismatch, match=r"another build of vuln_pie.*build-id [0-9a-f]{40} \(patch: 0{40}\)"
    ):
        live.apply(patch, t.pid)
    still_works(t)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_module_with_another_hash(targets, start):
    t = start("vuln_pie")
    text = patch_source(targets.vuln_pie, [FIX]).replace(
        "build_id = ", 'sha256 = "' + "ab" * 32 + '"\n#'
    )
    from micropatch.trust.admission import admit

    patch = admit(text.encode(), name="fix.toml", keys=None, allow_unsigned=True)
    with pytest.raises(ModuleMismatch, match=r"sha256 [0-9a-f]{64} \(patch: (ab){32}\)") as e:
        live.apply(patch, t.pid)
    assert (e.value.pid, e.value.patch_id) == (t.pid, "test-fix")
    still_works(t)


def test_module_not_loaded(targets, start):
    t = start("vuln_pie")
    patch = make_patch(targets.libvuln, [FIX])
    with pytest.raises(
        ModuleNotLoaded, match=rf"process {t.pid} \(vuln_pie\) does not map libvuln.so"
    ):
        live.apply(patch, t.pid)
    still_works(t)


def test_expected_bytes_do_not_match(targets, start):
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [{**FIX, "expect": "90 90 90 90 90"}])
    with pytest.raises(
        OriginalBytesMismatch, match=r"expected bytes 90 90 90 90 90, the module file has 85 f6"
    ):
        live.apply(patch, t.pid)
    still_works(t)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_bytes_in_memory_do_not_match(targets, start):
    """Another patch already owns the site: the second one is refused, naming it."""
    t = start("vuln_pie")
    first = make_patch(targets.vuln_pie, [FIX], id="first")
    second = make_patch(targets.vuln_pie, [FIX], id="second")
    live.apply(first, t.pid)
    with pytest.raises(OriginalBytesMismatch, match=r"holds e9 .* patch first v1 already patches"):
        live.apply(second, t.pid)
    assert [s.patch_id for s in live.status(t.pid)] == ["first"]
    assert t.cmd("call 65") == "-1"
    live.remove("first", t.pid)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_offset_not_an_instruction_boundary(targets, start):
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [{"at": "copy_packet+0x3", "code": "nop"}])
    with pytest.raises(NotInstructionBoundary, match=r"inside the instruction at"):
        live.apply(patch, t.pid)
    still_works(t)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_branch_into_the_site(targets, start):
    t = start("branchy")
    patch = make_patch(targets.branchy, [{"at": "branchy", "code": "nop"}])
    with pytest.raises(BranchIntoSite, match=r"jumps into|targets|branch"):
        live.apply(patch, t.pid)
    assert t.cmd("call 4") == "10"
    assert_untouched(targets, "branchy", t.pid, ["branchy"])


def test_seccomp_denies_mmap(targets, start):
    t = start("seccomp")
    assert t.cmd("trymmap") == "mmap EPERM"
    patch = make_patch(targets.seccomp, [FIX])
    with pytest.raises(RemoteSyscallError, match=r"seccomp filter .*(memfd_create|mmap)"):
        live.apply(patch, t.pid)
    still_works(t)
    assert_untouched(targets, "seccomp", t.pid, ["copy_packet"])


def test_remove_patch_not_applied(start):
    t = start("vuln_pie")
    with pytest.raises(NotApplied, match=rf"patch nothing-here is not applied to process {t.pid}"):
        live.remove("nothing-here", t.pid)
    still_works(t)


def test_apply_twice(targets, start):
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [FIX])
    live.apply(patch, t.pid)
    with pytest.raises(AlreadyApplied, match="use `micropatch update`"):
        live.apply(patch, t.pid)
    with pytest.raises(AlreadyApplied, match="nothing to update"):
        live.update(patch, t.pid)
    live.remove(patch.id, t.pid)


def test_update_of_patch_not_applied(targets, start):
    t = start("vuln_pie")
    with pytest.raises(NotApplied):
        live.update(make_patch(targets.vuln_pie, [FIX], version=2), t.pid)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_no_right_to_trace(targets, start):
    """An unprivileged user cannot trace root's process: the error says why and what to do."""
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [FIX])
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            live.apply(patch, t.pid)
            message = "applied!?"
        except BaseException as e:
            message = f"{type(e).__name__}: {e}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    os.waitpid(child, 0)
    assert message.startswith("TracePermissionDenied"), message
    assert f"process {t.pid}" in message and "belongs to uid 0 and you are uid 65534" in message
    assert "run micropatch as that user or as root" in message
    still_works(t)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("this is [not toml", "TOML"),
        (
            '[patch]\nversion = 1\n[target]\nmodule = "x"\nbuild_id = "ab"\n[[patchlet]]\nat = "f"\ncode = ""',
            "patch.id",
        ),
        (
            '[patch]\nid = "x"\nversion = 0\n[target]\nmodule = "x"\nbuild_id = "ab"\n[[patchlet]]\nat = "f"\ncode = ""',
            "patch.version",
        ),
        (
            '[patch]\nid = "x"\nversion = 1\n[target]\nmodule = "x"\n[[patchlet]]\nat = "f"\ncode = ""',
            "target",
        ),
        ('[patch]\nid = "x"\nversion = 1\n[target]\nmodule = "x"\nbuild_id = "ab"\n', "patchlet"),
        (
            '[patch]\nid = "x"\nversion = 1\n[target]\nmodule = "x"\nbuild_id = "ab"\n[[patchlet]]\nat = "f"\ncode = ""\nexpect = "zz"',
            "patchlet[0].expect",
        ),
        (
            '[patch]\nid = "x"\nversion = 1\ncolour = 1\n[target]\nmodule = "x"\nbuild_id = "ab"\n[[patchlet]]\nat = "f"\ncode = ""',
            "colour",
        ),
    ],
)
def test_malformed_patch_files(tmp_path, text, message):
    source = tmp_path / "bad.toml"
    source.write_text(text)
    done = subprocess.run(
        ["micropatch", "apply", str(source), "--pid", str(os.getpid()), "--allow-unsigned"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "error:" in done.stderr and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_code_that_does_not_assemble(targets, start):
    """Caught when the patch is planned, before the process is stopped; nothing changes."""
    from micropatch.errors import PatchFormatError

    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [{"at": "copy_packet", "code": "nop\nmov eax, [[rbx\n"}])
    with pytest.raises(PatchFormatError, match=r"patchlet\[0\] \(copy_packet\).*: line 2") as e:
        live.apply(patch, t.pid)
    assert (e.value.pid, e.value.patch_id, e.value.module) == (t.pid, "test-fix", "vuln_pie")
    still_works(t)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_zombie_process(targets, start):
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [FIX])
    t.proc.stdin.close()  # EOF: the target exits, and stays a zombie until reaped
    deadline = time.monotonic() + 10
    while "State:\tZ" not in Path(f"/proc/{t.pid}/status").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(ProcessExited, match=rf"process {t.pid} \(vuln_pie\) is a zombie"):
        live.apply(patch, t.pid)


def test_body_that_moves_past_the_red_zone_cannot_jump_out(targets, start):
    """rsp would be left 128 bytes off: refused before the process is touched."""
    from micropatch.errors import SiteError

    t = start("redzone")
    patch = make_patch(
        targets.redzone, [{"at": "rz_sum+0x7a", "code": "push rax\npop rax\njmp {rz_sum}"}]
    )
    with pytest.raises(
        SiteError,
        match=r"`jmp .*` \(body\+0x2\) leaves the body with rsp 0x80 bytes below the function's rsp at the site.*lea rsp, \[frame\]",
    ):
        live.apply(patch, t.pid)
    assert t.cmd("call 5") == str(14 * 5 + 91)
    assert_untouched(targets, "redzone", t.pid, ["rz_sum"])


@pytest.mark.parametrize(
    "code",
    [
        # Meant as a[13] = rax; run 128 bytes down it wrote [rsp-0x90] instead, silently.
        "mov qword ptr [rsp-0x10], rax",
        "push rax\nmov rax, qword ptr [rsp+8]\npop rax",
    ],
)
def test_body_below_the_red_zone_cannot_name_the_stack_by_rsp(targets, start, code):
    """Its rsp is not the function's: refused at planning, with what to write instead."""
    from micropatch.errors import SiteError

    t = start("redzone")
    patch = make_patch(targets.redzone, [{"at": "rz_sum+0x7a", "code": code}])
    with pytest.raises(
        SiteError,
        match=r"outside what the body has pushed.*runs it 128 bytes below the function's rsp.*write the function's \[rsp\+N\] as \[frame\+N\]",
    ):
        live.apply(patch, t.pid)
    assert t.cmd("call 5") == str(14 * 5 + 91)
    assert_untouched(targets, "redzone", t.pid, ["rz_sum"])


def test_reference_to_a_module_that_is_not_loaded(targets, start):
    t = start("vuln_pie")
    patch = make_patch(
        targets.vuln_pie, [{"at": "copy_packet", "code": "mov rax, {libnothere.so.1!foo}"}]
    )
    with pytest.raises(
        ModuleNotLoaded,
        match=rf"reference \{{libnothere.so.1!foo\}}: process {t.pid} \(vuln_pie\) does not map libnothere.so.1",
    ):
        live.apply(patch, t.pid)
    still_works(t)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_reference_to_a_symbol_another_module_lacks(targets, start):
    from micropatch.errors import SymbolNotFound

    t = start("vuln_pie")
    patch = make_patch(
        targets.vuln_pie, [{"at": "copy_packet", "code": "mov rax, {libc.so.6!no_such_function}"}]
    )
    with pytest.raises(SymbolNotFound, match=r"no_such_function"):
        live.apply(patch, t.pid)
    still_works(t)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_body_jumping_into_an_overwritten_site_is_refused_untouched(targets, start):
    """copy_packet+0x2 is inside the 8-byte site at copy_packet: the jump's bytes."""
    from micropatch.errors import BranchIntoSite

    t = start("vuln_pie")
    code = "cmp esi, 64\njle ok\njmp {copy_packet+0x2}\nok:"
    patch = make_patch(targets.vuln_pie, [{"at": "copy_packet", "code": code}])
    with pytest.raises(
        BranchIntoSite,
        match=r"patchlet\[0\] \(copy_packet\).*`jmp .*` \(body\+0x5\) refers to 0x[0-9a-f]+ \(0x[0-9a-f]+\), inside the site of patchlet\[0\]",
    ):
        live.apply(patch, t.pid)
    still_works(t)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
