"""Decorated functions: the function a decorator wraps is patched, wherever the
module's name points (a functools.wraps wrapper, lru_cache, contextmanager)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from micropatch.runtimes.cpython import engine, states

from .conftest import make_py_patch

DECORATED = """\
import contextlib
import functools


def deco(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapper


@deco
def wrapped(value):
    return "wrapped " + value


@functools.lru_cache(maxsize=None)
def cached(value):
    return "cached " + value


@contextlib.contextmanager
def managed(value):
    yield "managed " + value
"""

DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
from shop import decorated as d


def managed(value):
    with d.managed(value) as m:
        return m


print("ready", flush=True)
for line in sys.stdin:
    d.cached.cache_clear()  # a cached result would hide the patch (docs: limits)
    answers = []
    for f in (d.wrapped, d.cached, managed):
        try:
            answers.append(f(line.strip()))
        except ValueError as e:
            answers.append(f"ERR {e}")
    print(*answers, sep="|", flush=True)
"""
EVIL = "wrapped evil|cached evil|managed evil"


@pytest.mark.parametrize("at", ["wrapped", "cached", "managed"])
def test_a_decorated_function_is_patched_through_its_wrapper(
    shop: Path, python: str, at: str
) -> None:
    (shop / "shop" / "decorated.py").write_text(DECORATED)
    guard = {"at": at, "when": "value == 'evil'", "then": "raise ValueError('refused')"}
    digest = hashlib.sha256(DECORATED.encode()).hexdigest()
    patch = make_py_patch(shop, python, [guard], file="decorated.py", module="shop.decorated",
                          sha256=digest)  # fmt: skip
    proc = subprocess.Popen([python, "-c", DRIVER, str(shop)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip

    def ask(text: str) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(text + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert ask("evil") == EVIL
        engine.apply(patch, proc.pid)
        assert [s.sites for s in states.status(proc.pid)] == [(at,)]
        assert ask("evil") == EVIL.replace(f"{at} evil", "ERR refused")
        assert ask("ok") == "wrapped ok|cached ok|managed ok"
        v2 = {**guard, "then": "raise ValueError('refused by v2')"}
        engine.update(
            make_py_patch(
                shop,
                python,
                [v2],
                file="decorated.py",
                module="shop.decorated",
                sha256=digest,
                version=2,
            ),
            proc.pid,
        )
        assert ask("evil") == EVIL.replace(f"{at} evil", "ERR refused by v2")
        engine.remove("hdr-fix", proc.pid)
        assert ask("evil") == EVIL
    finally:
        proc.kill()
        proc.wait()
