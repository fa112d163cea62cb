"""Fixtures of the CPython runtime's tests: a real interpreter running pyshop.py
over a module `shop.parsers` in a temporary directory, and patches built for it."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from micropatch.runtimes.cpython.build import build
from micropatch.trust.admission import AdmittedPython, admit_any

HERE = Path(__file__).resolve().parent
PYTHON = os.environ.get("MICROPATCH_TEST_PYTHON", "/usr/bin/python3.11")

PARSERS = '''\
"""A module with a header parser to fix."""


def parse_header(line, limit=40):
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


class Parser:
    def feed(self, data):
        return len(data)

    @classmethod
    def check(cls, data):
        return data.isascii()
'''


class PyTarget:
    """A running pyshop.py: `ask` sends one line and returns the answer."""

    def __init__(self, proc: subprocess.Popen[str], directory: Path) -> None:
        self.proc = proc
        self.directory = directory
        line = self.read_line(10)
        assert line.startswith("ready "), line
        self.pid = int(line.split()[1])

    def read_line(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"pid {self.proc.pid}: no answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"pid {self.proc.pid} exited ({self.proc.poll()})")
        return line.rstrip("\n")

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read_line()

    def call(self, text: str) -> list[str]:
        """What each reference to the functions returns for `text`."""
        result: list[str] = json.loads(self.ask(f"call {text}"))
        return result

    def call_by_signal(self, text: str) -> list[str]:
        """`call` for a target whose main thread sleeps (--main sleep)."""
        (self.directory / "ask").write_text(text)
        os.kill(self.pid, signal.SIGUSR1)
        result: list[str] = json.loads(self.read_line())
        return result

    def alive(self) -> bool:
        return self.proc.poll() is None


StartPy = Callable[..., PyTarget]


@pytest.fixture(scope="session")
def python() -> str:
    if not Path(PYTHON).exists():
        pytest.skip(f"{PYTHON} is not installed")
    return PYTHON


@pytest.fixture(scope="session")
def clib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clib") / "libspin.so"
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(out), str(HERE / "spin.c")],
                   check=True)  # fmt: skip
    return out


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """The directory holding the package `shop` (its parsers.py: PARSERS, and a last
    line naming this directory). A file of this test's own (its SHA-256 is the
    module's identity): an agent of another test run on the machine, in the host's
    PID namespace (test_agent_python's crash test), never takes this test's
    interpreters for its own, nor this test's agent theirs."""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "parsers.py").write_text(f"{PARSERS}\n# {tmp_path}\n")
    return tmp_path


@pytest.fixture
def start_py(python: str, shop: Path, clib: Path) -> Iterator[StartPy]:
    started: list[subprocess.Popen[str]] = []

    def _start(
        *args: str, module_dir: Path | None = None, interpreter: str | None = None
    ) -> PyTarget:
        directory = module_dir or shop
        proc = subprocess.Popen(
            [interpreter or python, "-u", str(HERE / "pyshop.py"), str(directory), "--clib", str(clib), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(proc)
        return PyTarget(proc, directory)

    yield _start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def patch_toml(
    shop: Path, patchlets: list[dict[str, str]], *, id: str = "hdr-fix", version: int = 1,
    module: str = "shop.parsers", sha256: str | None = None,
) -> str:  # fmt: skip
    digest = sha256 or hashlib.sha256((shop / "shop" / "parsers.py").read_bytes()).hexdigest()
    lines = [
        "[patch]", f'id = "{id}"', f"version = {version}", f'title = "{id} v{version}"', "",
        "[target]", 'runtime = "cpython"', f'module = "{module}"', f'sha256 = "{digest}"', "",
    ]  # fmt: skip
    for p in patchlets:
        lines.append("[[patchlet]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in p.items()]
        lines.append("")
    return "\n".join(lines)


GUARD = {"at": "parse_header", "when": "len(line) > limit",
         "then": "blocked; raise ValueError('header too long')"}  # fmt: skip


def make_py_patch(
    shop: Path, python: str, patchlets: list[dict[str, str]] | None = None,
    file: str = "parsers.py", **kw: object,
) -> AdmittedPython:  # fmt: skip
    """A CPython patch built for `shop` by `python`, admitted unsigned (development)."""
    source = shop / f"patch-{kw.get('id', 'hdr-fix')}-{kw.get('version', 1)}.toml"
    source.write_text(patch_toml(shop, patchlets or [GUARD], **kw))  # type: ignore[arg-type]
    built = build(source, shop / "shop" / file, python=python)
    admitted = admit_any(built.to_bytes(), name=built.file_name, keys=None, allow_unsigned=True)
    assert isinstance(admitted, AdmittedPython)
    return admitted


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
