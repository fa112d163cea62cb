"""Issue 15: a real wheel's vendored library (`site-packages/pillow.libs/`), found by
the agent's index by identity and patched when it is loaded.

Pillow 12.1.0 is installed from PyPI into a temporary venv (skipped when the index
is unreachable), which is copied into a sandbox (tests/targets/isolation.py: own
PID + mount namespaces, a private tmpfs). A patch targets the wheel's renamed
libjpeg (`libjpeg-18a3f47f.so.62.4.0`, a `nop` before `jpeg_std_error`), and a
real NewProcesses (tests/targets/newproc.py) is told nothing of where it lives.
`import PIL.Image` loads it as auditwheel arranged it (DT_NEEDED of `_imaging`,
found through its RPATH `$ORIGIN/../pillow.libs`): the load is held and patched
before the import returns, and the interpreter then writes a JPEG through it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from integration.patching import patch_source
from targets.isolation import Sandbox, available, children
from targets.newproc import Agent

from micropatch import live
from micropatch.build.artifact import build as build_artifact
from micropatch.trust.keys import generate_key, write_key_pair

from .venvs import site_packages, venv_python

pytestmark = [
    pytest.mark.realworld,
    pytest.mark.skipif(not available(), reason="needs root, unshare and nsenter"),
    pytest.mark.skipif(
        sys.platform != "linux" or sys.version_info[:2] != (3, 11),
        reason="the patch targets the CPython 3.11 x86-64 Linux wheel of Pillow 12.1.0",
    ),
]

PILLOW = "pillow==12.1.0"
LIBRARY = "libjpeg-18a3f47f.so.62.4.0"
SCRIPT = """\
import io, os, sys
import PIL.Image
print("imported", flush=True)
sys.stdin.readline()
out = io.BytesIO()
PIL.Image.new("RGB", (8, 8), "red").save(out, "JPEG")
print("saved", out.getvalue()[:2].hex(), flush=True)
"""


def test_a_wheels_vendored_library_is_patched_when_imported(tmp_path: Path) -> None:
    python = venv_python(PILLOW)
    vendored = site_packages(python) / "pillow.libs" / LIBRARY
    if not vendored.exists():
        pytest.skip(f"the wheel has no {LIBRARY}")
    key = generate_key("wheel", expires_days=1)
    (tmp_path / "keys").mkdir()
    _, public = write_key_pair(key, tmp_path / "keys" / "wheel")
    source = tmp_path / "jpeg-fix.toml"
    source.write_text(patch_source(vendored, [{"at": "jpeg_std_error", "code": "nop"}],
                                   id="jpeg-fix"))  # fmt: skip
    (tmp_path / "jpeg-fix").mkdir()
    artifact = build_artifact(source, vendored).signed(key).write(tmp_path / "jpeg-fix")
    with Sandbox(tmp_path / "host") as box:
        venv = box.root / "venv"
        shutil.copytree(python.parent.parent, box.host_path(venv), symlinks=True)
        with Agent(box, public, [artifact]) as agent:
            assert agent.stats()["copies"] == 1  # found by identity, under its wheel name
            proc = subprocess.Popen(
                [*box.enter(), str(venv / "bin" / "python"), "-c", SCRIPT],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            )  # fmt: skip
            try:
                assert proc.stdout is not None and proc.stdin is not None
                assert proc.stdout.readline().strip() == "imported"
                [pid] = children(proc.pid)  # nsenter forked the interpreter
                carried = [(s.patch_id, s.version) for s in live.status(pid)]
                proc.stdin.write("go\n")
                saved = proc.stdout.readline().split()
                assert proc.wait(30) == 0
            finally:
                proc.kill()
                proc.wait()
            deadline = time.monotonic() + 5
            while not [e for e in agent.events if e["kind"] == "applied"]:
                assert time.monotonic() < deadline, agent.events
                agent.drain(0.1)
            stats = agent.stats()
    assert carried == [("jpeg-fix", 1)]  # patched before `import` returned
    assert saved == ["saved", "ffd8"]  # a JPEG, written through the patched library
    [applied] = [e for e in agent.events if e["kind"] == "applied"]
    assert applied["patch_id"] == "jpeg-fix" and applied["data"]["when"] == "load"
    assert applied["module"] == LIBRARY
    assert stats["patched_load"] == 1 and stats["released"] == 0 and stats["late"] == 0
