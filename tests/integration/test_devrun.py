"""`micropatch dev run`: a program started with a patch applied from its first
instruction, through the real CLI (a subprocess: dev run reaps its children)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from micropatch.build.artifact import build as build_artifact
from micropatch.trust.keys import generate_key, load_private_key, write_key_pair

from .patching import patch_source

# copy_packet: `call 65` answers -2 ("would have overflowed") unpatched, -1 with FIX.
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
GUARD = {"at": "copy_packet", "when": "esi > 64", "then": "blocked; return -1"}
COMMANDS = "call 65\ncall 10\nquit\n"

# Starts a thread, then dlopens the library named by argv[1] and calls copy_packet.
DLOPEN_C = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *idle(void *arg) { (void)arg; for (;;) pause(); return NULL; }
int main(int argc, char **argv) {
    pthread_t t;
    if (argc < 2 || pthread_create(&t, NULL, idle, NULL)) return 2;
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    int (*copy_packet)(const char *, int) = (int (*)(const char *, int))dlsym(lib, "copy_packet");
    char buf[128] = {0};
    printf("%d\n%d\n", copy_packet(buf, 65), copy_packet(buf, 10));
    return 3;
}
"""


def dev_run(*args: object, stdin: str = "") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["micropatch", "dev", "run", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def answers(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The program's answers, without its `ready PID` line."""
    return [line for line in done.stdout.splitlines() if not line.startswith("ready")]


def source(tmp_path: Path, module: Path, patchlets: list[dict[str, object]], **kw: str) -> Path:
    path = tmp_path / f"{module.name}.toml"
    path.write_text(patch_source(module, patchlets, **kw))  # type: ignore[arg-type]
    return path


def test_patched_at_entry_and_without(targets, tmp_path) -> None:
    fix = source(tmp_path, targets.vuln_pie, [FIX])
    done = dev_run(fix, "--allow-unsigned", "--", targets.vuln_pie, stdin=COMMANDS)
    assert done.returncode == 0, done.stderr
    assert answers(done) == ["-1", "10", "bye"]
    assert "applied test-fix v1 to vuln_pie at entry: 1 patchlet at 0x" in done.stderr
    assert "exited with status 0" in done.stderr

    plain = dev_run(fix, "--allow-unsigned", "--no-patch", "--", targets.vuln_pie, stdin=COMMANDS)
    assert plain.returncode == 0, plain.stderr
    assert answers(plain) == ["-2", "10", "bye"]
    assert "applied" not in plain.stderr and "--no-patch" in plain.stderr


def test_library_linked_at_start(targets, tmp_path) -> None:
    fix = source(tmp_path, targets.libvuln, [FIX])
    done = dev_run(fix, "--allow-unsigned", "--", targets.path("vuln_lib_main"), stdin=COMMANDS)
    assert done.returncode == 0, done.stderr
    assert answers(done) == ["-1", "10", "bye"]
    assert "applied test-fix v1 to libvuln.so at entry" in done.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_library_loaded_by_dlopen_in_a_threaded_program(targets, tmp_path) -> None:
    (tmp_path / "dl.c").write_text(DLOPEN_C)
    program = tmp_path / "dl"
    subprocess.run(["cc", "-O1", "-o", program, tmp_path / "dl.c", "-pthread", "-ldl"], check=True)
    fix = source(tmp_path, targets.libvuln, [FIX])
    done = dev_run(fix, "--allow-unsigned", "--", program, targets.libvuln)
    assert done.returncode == 3, done.stderr  # the program's own exit status
    assert done.stdout.split() == ["-1", "10"]
    assert "not loaded at entry: watching the dynamic linker" in done.stderr
    assert "applied test-fix v1 to libvuln.so after dlopen loaded libvuln.so" in done.stderr

    plain = dev_run(fix, "--allow-unsigned", "--no-patch", "--", program, targets.libvuln)
    assert plain.returncode == 3 and plain.stdout.split() == ["-2", "10"]


def test_signed_artifact(targets, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    write_key_pair(generate_key("dev", expires_days=30), keys / "dev")
    built = build_artifact(source(tmp_path, targets.vuln_pie, [FIX]), targets.vuln_pie)
    out = tmp_path / "built"
    out.mkdir()
    signed = built.signed(load_private_key(keys / "dev.key")).write(out)

    done = dev_run(signed, "--trust", keys / "dev.pub", "--", targets.vuln_pie, stdin=COMMANDS)
    assert done.returncode == 0, done.stderr
    assert answers(done) == ["-1", "10", "bye"]
    assert "applied test-fix v1 to vuln_pie at entry" in done.stderr

    untrusted = dev_run(signed, "--", targets.vuln_pie, stdin=COMMANDS)  # no trusted key
    assert untrusted.returncode == 1 and answers(untrusted) == []


def test_blocked_counters_at_exit(targets, tmp_path) -> None:
    guard = source(tmp_path, targets.vuln_pie, [GUARD])
    done = dev_run(
        guard, "--allow-unsigned", "--", targets.vuln_pie, stdin="call 65\ncall 70\ncall 10\nquit\n"
    )
    assert done.returncode == 0, done.stderr
    assert answers(done) == ["-1", "-1", "10", "bye"]
    assert "blocked: 2 exploit attempts (test-fix)" in done.stderr


def test_follows_exec_of_a_wrapper(targets, tmp_path) -> None:
    fix = source(tmp_path, targets.vuln_pie, [FIX])
    done = dev_run(
        fix, "--allow-unsigned", "--", "sh", "-c", f"exec {targets.vuln_pie}", stdin=COMMANDS
    )
    assert done.returncode == 0, done.stderr
    assert answers(done) == ["-1", "10", "bye"]


def test_exit_status_and_module_never_loaded(targets, tmp_path) -> None:
    fix = source(tmp_path, targets.vuln_pie, [FIX])
    done = dev_run(fix, "--allow-unsigned", "--", "sh", "-c", "exit 7")
    assert done.returncode == 7
    assert "module vuln_pie was never loaded; nothing was applied" in done.stderr

    killed = dev_run(fix, "--allow-unsigned", "--", "sh", "-c", "kill -SEGV $$")
    assert killed.returncode == 128 + 11
    assert "killed by SIGSEGV" in killed.stderr

    missing = dev_run(fix, "--allow-unsigned", "--", tmp_path / "no-such-program")
    assert missing.returncode == 127 and "cannot run" in missing.stderr


def test_module_mismatch_kills_unless_keep_going(targets, tmp_path) -> None:
    wrong = source(tmp_path, targets.vuln_pie, [FIX], build="ab" * 20)
    done = dev_run(wrong, "--allow-unsigned", "--", targets.vuln_pie, stdin=COMMANDS)
    assert done.returncode == 1
    assert "was not applied" in done.stderr and "another build of vuln_pie" in done.stderr
    assert "the program was killed" in done.stderr and answers(done) == []

    going = dev_run(
        wrong, "--allow-unsigned", "--keep-going", "--", targets.vuln_pie, stdin=COMMANDS
    )
    assert going.returncode == 0
    assert answers(going) == ["-2", "10", "bye"] and "ran unpatched" in going.stderr


def _start_dev_run(tmp_path: Path, program: Path, *extra: str) -> subprocess.Popen[str]:
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(program, [FIX]))
    return subprocess.Popen(
        ["micropatch", "dev", "run", source, "--allow-unsigned", *extra, "--", program],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _child_pid(dev: subprocess.Popen[str]) -> int:
    assert dev.stdout is not None
    line = dev.stdout.readline()  # the program's `ready PID`, through dev run's stdout
    assert line.startswith("ready"), line
    return int(line.split()[1])


def _gone(pid: int, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("extra", [(), ("--no-patch",)], ids=["patched", "no-patch"])
def test_killed_dev_run_takes_its_program_along(targets, tmp_path, extra):
    """SIGKILL of `dev run` must not leave the program running, re-parented."""
    import signal

    dev = _start_dev_run(tmp_path, targets.vuln_pie, *extra)
    child = _child_pid(dev)
    dev.send_signal(signal.SIGKILL)
    dev.wait(timeout=10)
    assert _gone(child), f"program {child} survived dev run"


def test_sigint_goes_to_the_program_and_dev_run_reports_it(targets, tmp_path):
    """SIGINT sent to `dev run` (not only ^C to the terminal's group) stops the
    program; dev run ends with the program's status, 128 + SIGINT."""
    import signal

    dev = _start_dev_run(tmp_path, targets.vuln_pie, "--no-patch")
    child = _child_pid(dev)
    dev.send_signal(signal.SIGINT)
    assert dev.wait(timeout=10) == 128 + signal.SIGINT
    assert _gone(child)
