"""The CPython patch format (patch/python.py) and the code identity (codeid.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from micropatch.errors import PatchFormatError
from micropatch.patch.python import PythonPatch
from micropatch.patch.source import parse_patch, parse_source
from micropatch.runtimes.cpython.codeid import code_identity

SHA = "a" * 64
HEAD = f"""
[patch]
id = "shop-header-len"
version = 1
title = "parse_header: refuse oversized header values"

[target]
runtime = "cpython"
module = "shop.parsers"
sha256 = "{SHA}"
"""


def _parse(patchlets: str, head: str = HEAD) -> PythonPatch:
    patch = parse_source(head + patchlets, "fix.toml")
    assert isinstance(patch, PythonPatch)
    return patch


def test_the_issue_example_parses() -> None:
    patch = _parse("""
[[patchlet]]
at = "parse_header"
when = "len(value) > 4096"
then = "raise ValueError('header value too long')"

[[patchlet]]
at = "Parser.feed"
python = '''def feed(self, data):
    return 0
'''
""")
    assert patch.target.module == "shop.parsers" and patch.target.sha256 == SHA
    assert [p.kind for p in patch.patchlets] == ["guard", "replacement"]
    assert not patch.patchlets[0].counts_blocked


def test_blocked_prefix_counts() -> None:
    patch = _parse('[[patchlet]]\nat = "f"\nwhen = "x"\nthen = "blocked; return None"\n')
    assert patch.patchlets[0].counts_blocked


@pytest.mark.parametrize(
    ("patchlet", "message"),
    [
        ('at = "f"\nwhen = "x"\nthen = "raise E"\npython = "def f(): pass"', "both given"),
        ('at = "f"\nthen = "raise E"', "when"),
        ('at = "f"\nwhen = "x >"\nthen = "raise E"', "when"),
        ('at = "f"\nwhen = "x"\nthen = "print(1)"', "raise EXPR"),
        ('at = "f(x)"\nwhen = "x"\nthen = "raise E"', "at"),
    ],
)
def test_bad_patchlets_are_refused(patchlet: str, message: str) -> None:
    with pytest.raises(PatchFormatError, match=message):
        _parse("[[patchlet]]\n" + patchlet + "\n")


def test_module_is_a_dotted_name_and_sha256_is_hex() -> None:
    with pytest.raises(PatchFormatError, match="not a module name"):
        _parse('[[patchlet]]\nat = "f"\nwhen = "x"\nthen = "return"\n',
               HEAD.replace('"shop.parsers"', '"shop/parsers.py"'))  # fmt: skip
    with pytest.raises(PatchFormatError, match="not a SHA-256"):
        _parse('[[patchlet]]\nat = "f"\nwhen = "x"\nthen = "return"\n', HEAD.replace(SHA, "xyz"))


def test_native_parsers_refuse_a_cpython_patch() -> None:
    with pytest.raises(PatchFormatError, match="cpython"):
        parse_patch(HEAD + '[[patchlet]]\nat = "f"\nwhen = "x"\nthen = "return"\n', "fix.toml")


SOURCE = """
def f(a, b=2):
    s = {"x", "y", "z", 1.5}
    return (a + b) in frozenset({"p", "q", "r"}) or s
"""


def _identity_in_a_new_interpreter(source: str, seed: str) -> str:
    program = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(sys.modules["micropatch"].__path__[0])!r})
        from micropatch.runtimes.cpython.codeid import code_identity
        ns = {{}}
        exec(compile({source!r}, "/some/where.py", "exec"), ns)
        print(code_identity(ns["f"].__code__))
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONHASHSEED": seed})  # fmt: skip
    return done.stdout.strip()


def test_code_identity_is_stable_across_runs_and_hash_seeds() -> None:
    ids = {_identity_in_a_new_interpreter(SOURCE, seed) for seed in ("0", "1", "12345")}
    assert len(ids) == 1


def test_code_identity_ignores_position_and_file_but_not_constants() -> None:
    def identity(source: str, filename: str = "a.py") -> str:
        ns: dict[str, object] = {}
        exec(compile(source, filename, "exec"), ns)
        return code_identity(ns["f"].__code__)  # type: ignore[attr-defined]

    base = identity(SOURCE)
    assert identity("# a comment\n\n" + SOURCE, "elsewhere/b.py") == base
    assert identity(SOURCE.replace("b=2", "b=3")) == base  # defaults live on the function
    assert identity(SOURCE.replace('"p"', '"P"')) != base
    assert identity(SOURCE.replace("a + b", "a - b")) != base
