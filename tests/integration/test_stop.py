"""Stop timeouts: a thread that cannot stop (a vfork parent, in killable sleep until
its child leaves) makes the attempt fail cleanly, retried within --retries."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropatch import live
from micropatch.agent.workers import Workers, in_own_thread
from micropatch.errors import StopTimeout
from micropatch.process import seized
from micropatch.process.procfs import read_status
from micropatch.process.world import stop_world

from .patching import make_patch

VFORKER = r"""
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) int work(int n) {
    int s = 0;
    for (int i = 0; i < n; i++) s += (i * i) ^ n;
    return s;
}

int main(void) {
    char c;
    if (vfork() == 0) {  /* the parent sleeps (state D) until this child exits */
        (void)!write(1, "ready\n", 6);
        (void)!read(0, &c, 1);
        _exit(0);
    }
    printf("alive %d\n", work(3));
    fflush(stdout);
    (void)!read(0, &c, 1);
    return 0;
}
"""


@pytest.fixture(scope="module")
def vforker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stop")
    (out / "vforker.c").write_text(VFORKER)
    exe = out / "vforker"
    subprocess.run(["cc", "-O2", "-Wl,--build-id=sha1", "-o", exe, out / "vforker.c"], check=True)
    return exe


@pytest.fixture
def stuck(vforker: Path) -> Iterator[subprocess.Popen[str]]:
    """A process whose only thread is in uninterruptible sleep; `release` it with a byte."""
    proc = subprocess.Popen([vforker], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    assert read_status(proc.pid).state == "D"
    yield proc
    proc.kill()
    proc.wait()


def test_stop_timeout_is_an_option_and_names_the_thread(stuck: subprocess.Popen[str]) -> None:
    with (
        pytest.raises(
            StopTimeout,
            match=rf"thread {stuck.pid} of process {stuck.pid} did not stop within 0.2 s "
            r"\(state D: uninterruptible sleep.*nothing was changed.*--stop-timeout",
        ),
        stop_world(stuck.pid, timeout=0.2),
    ):
        pass


def test_a_thread_left_seized_is_taken_back_by_the_next_stop(
    stuck: subprocess.Popen[str],
) -> None:
    with pytest.raises(StopTimeout), stop_world(stuck.pid, timeout=0.1):
        pass
    # It could not be detached while asleep; woken, it stops, still ours ...
    assert stuck.stdin is not None
    stuck.stdin.write("x")
    stuck.stdin.flush()
    with stop_world(stuck.pid, timeout=2) as proc:  # ... and a retry finds it again,
        assert list(proc.threads) == [stuck.pid]
    assert stuck.stdout is not None
    assert stuck.stdout.readline() == "alive 12\n"  # lets it go for good,
    assert read_status(stuck.pid).tracer_pid == 0  # and nothing traces it any more.


def test_apply_retries_a_stop_timeout_then_gives_up_untouched(
    vforker: Path, stuck: subprocess.Popen[str]
) -> None:
    patch = make_patch(vforker, [{"at": "work", "code": "nop"}])
    with pytest.raises(
        StopTimeout, match=r"gave up after 3 attempts; in the last, thread \d+ .* within 0.05 s"
    ) as caught:
        live.apply(patch, stuck.pid, retries=2, stop_timeout=0.05)
    assert caught.value.pid == stuck.pid and caught.value.patch_id == "test-fix"
    assert live.status(stuck.pid) == []
    assert "micropatch" not in Path(f"/proc/{stuck.pid}/maps").read_text()
    # Once the thread can stop, the same operation succeeds, taking back the thread
    # the failed attempts left seized, and lets it go.
    assert stuck.stdin is not None and stuck.stdout is not None
    stuck.stdin.write("x")
    stuck.stdin.flush()
    assert live.apply(patch, stuck.pid, stop_timeout=2).action == "applied"
    assert stuck.stdout.readline() == "alive 12\n"
    assert read_status(stuck.pid).tracer_pid == 0


def test_cli_stop_timeout(stuck: subprocess.Popen[str]) -> None:
    done = subprocess.run(
        [
            "micropatch",
            "remove",
            "test-fix",
            "--pid",
            str(stuck.pid),
            "--stop-timeout",
            "0.05",
            "--retries",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "gave up after 2 attempts; in the last, thread" in done.stderr
    assert "did not stop within 0.05 s" in " ".join(done.stderr.split())
    # The command has exited, and with it the tracer: nothing holds the thread.
    assert read_status(stuck.pid).tracer_pid == 0


def _wake(stuck: subprocess.Popen[str]) -> None:
    assert stuck.stdin is not None
    stuck.stdin.write("x")
    stuck.stdin.flush()


def _runs_untraced(stuck: subprocess.Popen[str]) -> None:
    assert stuck.stdout is not None
    assert stuck.stdout.readline() == "alive 12\n"  # it ran on: not kept in a ptrace stop
    assert read_status(stuck.pid).tracer_pid == 0


def test_release_lets_go_a_thread_left_seized_once_it_stops(stuck: subprocess.Popen[str]) -> None:
    with pytest.raises(StopTimeout), stop_world(stuck.pid, timeout=0.1):
        pass
    assert seized.release() == 1  # asleep still: held
    _wake(stuck)
    deadline = time.monotonic() + 10
    while seized.release() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seized.release() == 0
    _runs_untraced(stuck)


def test_an_agent_worker_that_holds_a_thread_ends_and_lets_it_go(
    stuck: subprocess.Popen[str],
) -> None:
    """The agent's long-lived workers: the one whose stop timed out ends (its exit
    detaches), rather than keeping the target's thread stopped once it wakes."""
    workers = Workers(2, keep=2, idle=30)
    workers.start()
    failed = threading.Event()

    def job() -> None:
        with contextlib.suppress(StopTimeout), stop_world(stuck.pid, timeout=0.1):
            pass
        failed.set()

    try:
        workers.submit(job)
        assert failed.wait(10)
        deadline = time.monotonic() + 10
        while len(workers._threads) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(workers._threads) == 1  # the holder ended
        _wake(stuck)
        _runs_untraced(stuck)
        ran = threading.Event()
        workers.submit(ran.set)  # the pool still works
        assert ran.wait(10)
    finally:
        workers.stop()


def test_in_own_thread_leaves_nothing_seized(stuck: subprocess.Popen[str]) -> None:
    def attempt() -> None:
        with stop_world(stuck.pid, timeout=0.1):
            pass

    with pytest.raises(StopTimeout):
        in_own_thread(attempt)
    # Let go as its tracer ends (the OS thread outlives the Python thread's join by a hair).
    deadline = time.monotonic() + 5
    while read_status(stuck.pid).tracer_pid and time.monotonic() < deadline:
        time.sleep(0.005)
    assert read_status(stuck.pid).tracer_pid == 0
    _wake(stuck)
    _runs_untraced(stuck)
