"""The `micropatch` command with a CPython patch: build, sign, verify, inspect, and
apply/status/update/remove through the same verbs as native patches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from micropatch.runtimes.cpython.page import MAPS_NAME
from micropatch.trust.keys import generate_key, write_key_pair

from .conftest import GUARD, StartPy, patch_toml
from .test_live import BLOCKED_LONG, LONG, ORIGINAL_LONG


def micropatch(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "micropatch.cli.main", *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={**os.environ, "MICROPATCH_NO_AGENT": "1", "COLUMNS": "250"},
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _build(shop: Path, python: str, version: int, then: str) -> Path:
    source = shop / f"fix-v{version}.toml"
    source.write_text(patch_toml(shop, [{**GUARD, "then": then}], version=version))
    out = shop / "out"
    done = micropatch("build", source, "--module", shop / "shop" / "parsers.py",
                      "--key", shop / "dev.key", "--python", python, "-o", f"{out}/")  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert "CPython 3." in done.stdout
    assert "artifact id " in done.stdout and "signed by key 'dev'" in done.stdout
    [artifact] = [p for p in out.iterdir() if p.name.startswith(f"hdr-fix-v{version}-")]
    return artifact


def test_apply_status_update_remove(
    start_py: StartPy, shop: Path, python: str, tmp_path: Path
) -> None:
    own = _own(python, tmp_path)
    write_key_pair(generate_key("dev"), shop / "dev")
    v1 = _build(shop, python, 1, GUARD["then"])
    v2 = _build(shop, python, 2, "return ('too-long', '')")
    trust = ("--trust", shop / "dev.pub")

    done = micropatch("verify", v1, *trust)
    assert done.returncode == 0 and "CPython 3." in done.stdout and "shop.parsers" in done.stdout
    done = micropatch("inspect", v1)
    assert done.returncode == 0
    assert "original bytecode" in done.stdout and "header too long" in done.stdout

    target = start_py(interpreter=str(own))
    done = micropatch("apply", v1, "--pid", target.pid, *trust)
    assert done.returncode == 0, done.stderr
    assert (
        f"applied hdr-fix v1 (1 function) in pid {target.pid}; in force after"
        in done.stdout + done.stderr
    )
    assert target.call(LONG) == BLOCKED_LONG

    done = micropatch("status", "--pid", target.pid)
    _header, row = done.stdout.splitlines()
    assert row.split("\t")[2:6] == ["shop.parsers (cpython)", "hdr-fix", "1", "parse_header"]
    assert row.split("\t")[7] == "3"  # the three blocked calls
    assert str(target.pid) in micropatch("status").stdout
    done = micropatch("inspect", v1, "--pid", target.pid)
    assert f"process {target.pid}: version 1 applied, 3 blocked" in done.stdout

    done = micropatch("apply", v1, "--pid", target.pid, *trust)
    assert done.returncode == 1 and "already applied" in done.stdout + done.stderr

    done = micropatch("update", v2, "--all", "--exe", own, *trust)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 done" in done.stdout + done.stderr
    assert target.call(LONG)[:3] == [repr(("too-long", ""))] * 3

    done = micropatch("remove", "hdr-fix", "--pid", target.pid)
    assert done.returncode == 0, done.stdout + done.stderr
    assert target.call(LONG) == ORIGINAL_LONG
    assert "no micropatch applied" in micropatch("status", "--pid", target.pid).stdout


def _own(python: str, tmp_path: Path) -> Path:
    """A copy of the interpreter for `--all --exe`: only the interpreters of this test,
    never another process of the host (other test sessions run interpreters carrying
    patches of the same id)."""
    own = tmp_path / "bin" / Path(python).name
    own.parent.mkdir()
    shutil.copy2(python, own)
    if subprocess.run([own, "-c", "pass"], capture_output=True).returncode != 0:
        pytest.skip(f"a copy of {python} does not run (its libpython is found relative to it)")
    return own


def test_apply_all_passes_over_interpreters_without_the_module(
    start_py: StartPy, shop: Path, python: str, tmp_path: Path
) -> None:
    own = _own(python, tmp_path)
    write_key_pair(generate_key("dev"), shop / "dev")
    v1 = _build(shop, python, 1, GUARD["then"])
    target = start_py(interpreter=str(own))
    bare = start_py("--bare", interpreter=str(own))  # never imports shop.parsers
    done = micropatch("apply", v1, "--all", "--exe", str(own), "--trust", shop / "dev.pub")
    text = done.stdout + done.stderr
    assert f"applied hdr-fix v1 (1 function) in pid {target.pid}; in force after" in text, text
    assert "1 done, 0 failed, 0 skipped" in text, text
    assert target.call(LONG) == BLOCKED_LONG
    # Read from memory that it lacks the module: never touched, no page mapped.
    assert MAPS_NAME in Path(f"/proc/{target.pid}/maps").read_text()
    assert MAPS_NAME not in Path(f"/proc/{bare.pid}/maps").read_text()
    assert bare.ask("x") == "bare"
    done = micropatch("remove", "hdr-fix", "--all", "--exe", str(own))
    assert done.returncode == 0 and "1 done" in done.stdout + done.stderr
    assert target.call(LONG) == ORIGINAL_LONG


def test_a_cpython_source_needs_a_build(shop: Path) -> None:
    source = shop / "fix.toml"
    source.write_text(patch_toml(shop, [GUARD]))
    done = micropatch("apply", source, "--pid", os.getpid(), "--allow-unsigned")
    assert done.returncode == 1
    assert "must first be compiled" in done.stdout + done.stderr
