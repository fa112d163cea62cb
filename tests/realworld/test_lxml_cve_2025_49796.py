"""CVE-2025-49796 (and CVE-2025-49794) in lxml 6.0.0, fixed live by patches/lxml-CVE-2025-49796.

lxml 6.0.0 links libxml2 2.14.4 statically into `lxml/etree.cpython-311-x86_64-linux-gnu.so`.
Its Schematron report formatter reads `node->ns`/`node->name` of whatever node an
`<sch:name path="..."/>` XPath selects: a namespace node (an `xmlNs`, already freed)
crashes the interpreter, the document node prints heap garbage. lxml 6.0.1 (libxml2
2.14.5) only reports element and attribute names; the micropatch does the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropatch import live
from micropatch.patch.source import load_patch
from micropatch.trust.admission import admit

from .venvs import site_packages, venv_python

pytestmark = [
    pytest.mark.realworld,
    pytest.mark.skipif(
        sys.version_info[:2] != (3, 11) or sys.platform != "linux",
        reason="the patch targets lxml 6.0.0's CPython 3.11 x86-64 Linux wheel",
    ),
]

HERE = Path(__file__).resolve().parents[2] / "patches" / "lxml-CVE-2025-49796"
PATCH = HERE / "patch.toml"
POCS = HERE / "pocs"
MODULE = "etree.cpython-311-x86_64-linux-gnu.so"

# What lxml 6.0.1 reports for both proofs of concept (checked by test_fixed_release):
# the <sch:name> adds nothing, the message is the context path, the line, and the blank text.
FIXED_RESULT = [False, [[2, "SCHEMATRONV_REPORT", "/librar0/boo0 line 2:  "]]]

SCHEMA = """\
<sch:schema xmlns:sch="http://purl.oclc.org/dsdl/schematron">
  <sch:ns prefix="q" uri="urn:q"/>
  <sch:pattern id="books">
    <sch:rule context="book">
      <sch:assert test="@id">book <sch:name/> has no id</sch:assert>
      <sch:report test="@q:old">attribute <sch:name path="@q:old"/> on <sch:name path="."/></sch:report>
      <sch:report test="count(q:note) &gt; 1">too many <sch:name path="q:note"/> in <sch:value-of select="@id"/></sch:report>
    </sch:rule>
  </sch:pattern>
</sch:schema>
"""
VALID = '<library xmlns:q="urn:q"><book id="1"/><book id="2"><q:note/></book></library>'
INVALID = (
    '<library xmlns:q="urn:q"><book/><book id="2" q:old="y"/>'
    '<book id="3"><q:note/><q:note/></book></library>'
)
# The answers of both 6.0.0 and 6.0.1 (a node-set <sch:value-of> prints node names).
NORMAL = [
    [True, []],
    [
        False,
        [
            [1, "SCHEMATRONV_ASSERT", "/library/book[1] line 1: book book has no id"],
            [1, "SCHEMATRONV_REPORT", "/library/book[2] line 1: attribute q:old on book"],
            [1, "SCHEMATRONV_REPORT", "/library/book[3] line 1: too many q:note in id"],
        ],
    ],
]

CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from lxml import etree

schema, valid, invalid, pocs = sys.argv[1:5]

def validate(sch, doc):
    s = etree.Schematron(sch)
    ok = s.validate(doc)
    return [ok, [[e.line, e.type_name, e.message] for e in s.error_log]]

def normal():
    sch = etree.fromstring(schema)
    return [validate(sch, etree.fromstring(valid)), validate(sch, etree.fromstring(invalid))]

def poc(name):
    return validate(etree.parse(f"{pocs}/{name}.sct"), etree.parse(f"{pocs}/{name}_0.xml"))

print(json.dumps({"ready": normal()}), flush=True)
for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    print(json.dumps(normal() if command == "normal" else poc(arg)), flush=True)
"""

TRIGGER = r"""
import sys, warnings
warnings.simplefilter("ignore")
from lxml import etree
s = etree.Schematron(etree.parse(sys.argv[1]))
print(s.validate(etree.parse(sys.argv[2])), flush=True)
"""


@pytest.fixture(scope="module")
def python() -> Path:
    """bin/python of a venv with lxml 6.0.0, whose etree module is the build the patch is for."""
    python = venv_python("lxml==6.0.0")
    module = site_packages(python) / "lxml" / MODULE
    digest = hashlib.sha256(module.read_bytes()).hexdigest()
    expected = load_patch(PATCH).target.sha256
    if digest != expected:
        pytest.skip(
            f"pip installed another build of lxml 6.0.0 ({MODULE} sha256 {digest}); the patch "
            f"is for the manylinux_2_28 x86-64 wheel ({expected})"
        )
    return python


def trigger(python: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-c", TRIGGER, str(POCS / f"{name}.sct"), str(POCS / f"{name}_0.xml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


class Interpreter:
    """A long-lived interpreter of the venv, answering one JSON line per command."""

    def __init__(self, python: Path) -> None:
        self.process = subprocess.Popen(
            [str(python), "-c", CHILD, SCHEMA, VALID, INVALID, str(POCS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.pid = self.process.pid

    def read(self, timeout: float = 30.0) -> object:
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            code = self.process.poll()
            if code is None:
                raise AssertionError(f"interpreter {self.pid} gave no answer in {timeout} s")
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise AssertionError(f"interpreter {self.pid} died ({how}): {stderr[-2000:]}")
        return json.loads(line)

    def ask(self, command: str) -> object:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> int:
        if self.process.poll() is None and self.process.stdin is not None:
            self.process.stdin.close()
            try:
                return self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()


@pytest.fixture
def interpreter(python: Path) -> Iterator[Interpreter]:
    running = Interpreter(python)
    try:
        yield running
    finally:
        running.close()


def test_unpatched_release_crashes_on_the_poc(python: Path) -> None:
    done = trigger(python, "cve-2025-49796")
    assert done.returncode < 0, (
        f"lxml 6.0.0 was expected to crash on the CVE-2025-49796 input, got exit status "
        f"{done.returncode}: {done.stdout!r} {done.stderr[-500:]!r}"
    )
    assert done.returncode == -signal.SIGSEGV


def test_live_patch_makes_the_poc_harmless(interpreter: Interpreter) -> None:
    before = interpreter.read()
    assert isinstance(before, dict)
    normal = before["ready"]
    # The ordinary inputs exercise the patched code with element and attribute nodes.
    assert normal == NORMAL

    patch = admit(PATCH.read_bytes(), name=str(PATCH), keys=None, allow_unsigned=True)
    started = time.perf_counter()
    outcome = live.apply(patch, interpreter.pid)
    took = time.perf_counter() - started
    assert (outcome.action, outcome.sites) == ("applied", 2)
    maps = Path(f"/proc/{interpreter.pid}/maps").read_text()
    assert "micropatch" in maps
    print(f"applied in {took:.3f} s, process paused {outcome.paused * 1000:.2f} ms")

    # The crash input now behaves as in lxml 6.0.1; so does the use-after-free one.
    assert interpreter.ask("poc cve-2025-49796") == FIXED_RESULT
    assert interpreter.ask("poc cve-2025-49794") == FIXED_RESULT
    assert interpreter.ask("normal") == normal

    removed = live.remove(patch.id, interpreter.pid)
    assert (removed.action, removed.sites) == ("removed", 2)
    assert interpreter.ask("normal") == normal
    assert interpreter.close() == 0


def test_fixed_release_gives_the_same_answer() -> None:
    """lxml 6.0.1 (libxml2 2.14.5, the upstream fix) on the same inputs: the reference."""
    python = venv_python("lxml==6.0.1")
    answers = subprocess.run(
        [str(python), "-c", CHILD.replace("for line in sys.stdin:", "for line in []:")
         + "print(json.dumps([poc('cve-2025-49796'), poc('cve-2025-49794')]))",
         SCHEMA, VALID, INVALID, str(POCS)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert answers.returncode == 0, answers.stderr[-2000:]
    ready, pocs = (json.loads(line) for line in answers.stdout.splitlines())
    assert pocs == [FIXED_RESULT, FIXED_RESULT]
    assert ready == {"ready": NORMAL}  # as 6.0.0


@pytest.mark.parametrize("name", ["cve-2025-49796", "cve-2025-49794"])
def test_dev_run_patches_the_interpreter_from_its_start(python: Path, name: str) -> None:
    """`micropatch dev run` starts the interpreter, patches etree when Python dlopens it,
    and the PoC gives 6.0.1's answer instead of a crash."""
    done = subprocess.run(
        ["micropatch", "dev", "run", str(PATCH), "--allow-unsigned", "--",
         str(python), "-c", TRIGGER, str(POCS / f"{name}.sct"), str(POCS / f"{name}_0.xml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert f"after dlopen loaded {MODULE}" in done.stderr, done.stderr
