"""Issue 7.3: two operations on one process queue behind its lock instead of failing."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from micropatch import live
from micropatch.errors import Busy
from micropatch.live import lock

from .patching import make_patch, patch_source

# copy_packet: `call 65` answers -2 ("would have overflowed"); FIX makes it -1.
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
OTHER = {"at": "copy_packet+0x11", "code": "nop"}  # another site, changes nothing visible


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["micropatch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(proc: subprocess.Popen[str], text: str, timeout: float = 30) -> str:
    """Read proc's stderr until a line holds `text`; returns that line.

    Reads the pipe's descriptor directly: a buffered readline after select() can
    leave the awaited line in Python's buffer, where select() never sees it."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        assert chunk, f"stderr closed before {text!r}; exit {proc.wait()}: {seen!r}"
        seen += chunk
        for line in seen.decode(errors="replace").splitlines():
            if text in line:
                return line
    pytest.fail(f"no {text!r} on stderr within {timeout} s: {seen!r}")


def test_two_applies_at_once_both_succeed_in_turn(targets, start, tmp_path):
    t = start("vuln_pie")
    for name, patchlet in (("a", FIX), ("b", OTHER)):
        (tmp_path / f"{name}.toml").write_text(patch_source(targets.vuln_pie, [patchlet], id=name))
    # Hold the lock, so that both commands are surely waiting at the same time.
    with lock.hold(t.pid):
        first = _cli("apply", str(tmp_path / "a.toml"), "--pid", str(t.pid), "--allow-unsigned")
        second = _cli("apply", str(tmp_path / "b.toml"), "--pid", str(t.pid), "--allow-unsigned")
        for waiter in (first, second):
            line = _wait_for(waiter, "waiting up to 30 s")
            assert f"process {t.pid} is being patched by micropatch (pid {os.getpid()}, `" in line
        assert live.status(t.pid) == []
    for proc in (first, second):
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assert "applied" in stdout
    assert sorted(s.patch_id for s in live.status(t.pid)) == ["a", "b"]
    assert t.cmd("call 65") == "-1"


def test_timeout_names_the_holder_and_changes_nothing(targets, start, tmp_path):
    t = start("vuln_pie")
    (tmp_path / "a.toml").write_text(patch_source(targets.vuln_pie, [FIX], id="a"))
    with lock.hold(t.pid):
        started = time.monotonic()
        done = subprocess.run(
            ["micropatch", "apply", str(tmp_path / "a.toml"), "--pid", str(t.pid),
             "--allow-unsigned", "--lock-timeout", "0.3"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert time.monotonic() - started >= 0.3
    assert done.returncode == 1
    stderr = " ".join(done.stderr.split())
    assert f"process {t.pid} is being patched by micropatch (pid {os.getpid()}, `" in stderr
    assert "still after waiting 0.3 s; nothing was changed" in stderr
    assert "--lock-timeout" in stderr
    assert live.status(t.pid) == [] and t.cmd("call 65") == "-2"


def test_engine_raises_busy_with_fields(targets, start):
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [FIX], id="a")
    with lock.hold(t.pid), lock.waiting(timeout=0.1), pytest.raises(Busy) as caught:
        live.apply(patch, t.pid)
    assert (caught.value.pid, caught.value.patch_id, caught.value.holder) == (
        t.pid, "a", os.getpid(),
    )  # fmt: skip
    assert live.status(t.pid) == []
    live.apply(patch, t.pid)  # the lock is free again
    assert t.cmd("call 65") == "-1"


def test_a_holder_killed_mid_operation_frees_the_lock(targets, start, tmp_path):
    t = start("vuln_pie")
    (tmp_path / "a.toml").write_text(patch_source(targets.vuln_pie, [FIX], id="a"))
    code = (
        "import time\nfrom micropatch.live.lock import hold\n"
        f"with hold({t.pid}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    apply = ["micropatch", "apply", str(tmp_path / "a.toml"), "--pid", str(t.pid), "--allow-unsigned"]  # fmt: skip
    refused = subprocess.run([*apply, "--lock-timeout", "0.1"], capture_output=True, text=True)
    assert refused.returncode == 1 and f"(pid {holder.pid}, `" in " ".join(refused.stderr.split())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    done = subprocess.run([*apply, "--lock-timeout", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert t.cmd("call 65") == "-1"
