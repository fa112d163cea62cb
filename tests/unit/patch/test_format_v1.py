"""Format v1: header and target fields, the three body kinds, and their errors."""

from __future__ import annotations

import re

import pytest

from micropatch.bodies.assemble import assemble
from micropatch.bodies.cbody import CCompileError
from micropatch.bodies.toolchain import Toolchain
from micropatch.errors import PatchFormatError
from micropatch.patch.guard import GuardError
from micropatch.patch.model import Patch
from micropatch.patch.source import parse_patch

V1 = '''
[patch]
id = "pillow-cve-2026-25990"
version = 1
title = "Refuse negative offsets in _setimage"
cves = ["CVE-2026-25990", "cve-2026-0001"]
author = "A. Author <a@example.org>"

[target]
module = "_imaging.cpython-311-x86_64-linux-gnu.so"
build_id = "4f0c9a"
arch = "x86_64"

[[patchlet]]
at = "_setimage+0x40"
when = "rsi < 0 || rdx < 0"
then = "jump _setimage+0x1a4"

[[patchlet]]
at = "check_len"
code = """
cmp esi, 64
"""

[[patchlet]]
at = "copy_packet"
c = """
mp_verdict patchlet(struct mp_regs *r)
{
    if ((mp_i32)r->rsi > 64)
        return MP_BLOCKED(MP_JUMP(1));
    return MP_CONTINUE;
}
"""
jumps = ["copy_packet+0xb6", "copy_packet_error"]
'''


def test_v1_source() -> None:
    patch = parse_patch(V1, "v1.toml")
    assert patch.info.cves == ("CVE-2026-25990", "CVE-2026-0001")
    assert patch.info.author == "A. Author <a@example.org>"
    assert patch.target.arch == "x86_64"
    guard, _, c = patch.patchlets
    assert (guard.when, guard.then, guard.code, guard.c) == (
        "rsi < 0 || rdx < 0",
        "jump _setimage+0x1a4",
        None,
        None,
    )
    assert [p.kind for p in patch.patchlets] == ["guard", "code", "c"]
    assert c.jumps == ("copy_packet+0xb6", "copy_packet_error")
    data = patch.model_dump(by_alias=True, mode="json")
    assert Patch.model_validate(data) == patch


def test_defaults() -> None:
    patch = parse_patch(V1.replace('arch = "x86_64"\n', "").replace("cves = [", "#"), "v1.toml")
    assert patch.target.arch == "x86_64" and patch.info.cves == ()


def _replace(old: str, new: str) -> str:
    assert old in V1, old
    return V1.replace(old, new)


MALFORMED = [
    (
        "bad cve",
        _replace('"cve-2026-0001"', '"CVE-2026-1"'),
        r"patch\.cves\[1\]: 'CVE-2026-1' is not a CVE id: expected CVE-YYYY-NNNN \(a year, then 4 or more digits\)",
    ),
    (
        "cve not a string",
        _replace('"cve-2026-0001"', "2026"),
        r"patch\.cves\[1\]: must be a string, got the integer 2026",
    ),
    (
        "cves not an array",
        _replace('cves = ["CVE-2026-25990", "cve-2026-0001"]', 'cves = "CVE-2026-25990"'),
        r"patch\.cves: must be an array of strings, got the string 'CVE-2026-25990'",
    ),
    (
        "duplicate cve",
        _replace('"cve-2026-0001"', '"cve-2026-25990"'),
        r"patch\.cves: CVE-2026-25990 listed more than once",
    ),
    (
        "author not a string",
        _replace('author = "A. Author <a@example.org>"', "author = 1"),
        r"patch\.author: must be a string, got the integer 1",
    ),
    (
        "arch",
        _replace('arch = "x86_64"', 'arch = "aarch64"'),
        r"target\.arch: 'aarch64' is not supported: micropatch patches x86-64 processes only \(arch = \"x86_64\"\)",
    ),
    (
        "arch alias",
        _replace('arch = "x86_64"', 'arch = "amd64"'),
        r"target\.arch: write 'x86_64' \(the name uname -m prints\), not 'amd64'",
    ),
    (
        "two bodies",
        _replace('then = "jump _setimage+0x1a4"', 'then = "jump _setimage+0x1a4"\ncode = "nop"'),
        r"patchlet\[0\]: code and when are both given, but a patchlet has exactly one body: "
        r"code \(assembly\), when \+ then \(a guard\), or c \(C\)",
    ),
    (
        "three bodies",
        _replace(
            'then = "jump _setimage+0x1a4"',
            'then = "jump x"\ncode = "nop"\nc = "mp_verdict patchlet(struct mp_regs *r) { (void)r; return MP_CONTINUE; }"',
        ),
        r"patchlet\[0\]: code, when and c are all given",
    ),
    (
        "no body",
        _replace('code = """\ncmp esi, 64\n"""', ""),
        r"patchlet\[1\]\.code: required field is missing; give the patchlet's body as code "
        r"\(assembly\), when \+ then \(a guard\) or c \(C\)",
    ),
    (
        "no body and a typo",
        _replace('code = """\ncmp esi, 64\n"""', 'expcet = "00"'),
        r"2 problems:\n  patchlet\[1\]\.expcet: unknown field .*did you mean 'expect'\?\n"
        r"  patchlet\[1\]\.code: required field is missing",
    ),
    (
        "when without then",
        _replace('then = "jump _setimage+0x1a4"', ""),
        r"patchlet\[0\]\.then: required with when: what to do when the condition holds "
        r"\('jump LOCATION', 'return VALUE' or 'return'\)",
    ),
    (
        "then without when",
        _replace('when = "rsi < 0 || rdx < 0"', ""),
        r"patchlet\[0\]\.when: required with then: the condition",
    ),
    (
        "then with code",
        _replace('code = """\ncmp esi, 64\n"""', 'code = "nop"\nthen = "return"'),
        r"patchlet\[1\]\.then: only for guards: give the condition in when",
    ),
    (
        "jumps without c",
        _replace('code = """\ncmp esi, 64\n"""', 'code = "nop"\njumps = ["f"]'),
        r"patchlet\[1\]\.jumps: only for c bodies; in code write \{location\}, in a guard 'jump LOCATION'",
    ),
    (
        "bad jump location",
        _replace('"copy_packet_error"', '"copy packet error"'),
        r"patchlet\[2\]\.jumps: \[1\]: 'copy packet error' is not a location",
    ),
    (
        "jumps not strings",
        _replace('"copy_packet_error"]', "2]"),
        r"patchlet\[2\]\.jumps\[1\]: must be a string, got the integer 2",
    ),
    (
        "jump index out of range",
        _replace(
            'jumps = ["copy_packet+0xb6", "copy_packet_error"]', 'jumps = ["copy_packet+0xb6"]'
        ),
        r"patchlet\[2\]\.c: MP_JUMP\(1\), but jumps lists 1 location \(indexes start at 0\)",
    ),
    (
        "guard syntax",
        _replace('"rsi < 0 || rdx < 0"', '"rsi < 0 ||"'),
        r"patchlet\[0\]\.when: 'rsi < 0 \|\|': expected a register, a memory operand or a number, "
        r"found 'end of the condition' at the end",
    ),
    (
        "guard register",
        _replace('"rsi < 0 || rdx < 0"', '"rsi < 0 || rdz < 0"'),
        r"patchlet\[0\]\.when: 'rsi < 0 \|\| rdz < 0': unknown register 'rdz'",
    ),
    (
        "then syntax",
        _replace('"jump _setimage+0x1a4"', '"goto _setimage+0x1a4"'),
        r"patchlet\[0\]\.then: 'goto _setimage\+0x1a4': write 'jump _setimage\+0x1a4'",
    ),
    (
        "then location",
        _replace('"jump _setimage+0x1a4"', '"jump _setimage-4"'),
        r"patchlet\[0\]\.then: 'jump _setimage-4': jump '_setimage-4' is not a location",
    ),
    (
        "c not a string",
        _replace('c = """', 'c = 1\nx = """'),
        r"patchlet\[2\]\.c: must be a string, got the integer 1",
    ),
]


@pytest.mark.parametrize(
    ("source", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed(source: str, expected: str) -> None:
    with pytest.raises(PatchFormatError) as err:
        parse_patch(source, "v1.toml")
    message = str(err.value)
    assert message.startswith("v1.toml: ")
    assert re.search(expected, message), message


def test_body_source_per_kind() -> None:
    guard, code, c = parse_patch(V1).patchlets
    assert Toolchain().body_source(code, at_entry=False) == code.code
    source = Toolchain().body_source(guard, at_entry=False)
    assert "jmp {_setimage+0x1a4}" in source and "pushfq" in source
    machine = assemble(source, 0x7F00_0000_0000, lambda _: 0x7F00_0000_1000)
    assert machine.startswith(b"\x9c")  # pushfq
    source = Toolchain().body_source(c, at_entry=True, counter=0x1000)
    assert "call mp_c_entry" in source and "jmp {copy_packet_error}" in source


def test_body_source_errors_name_the_field() -> None:
    patch = parse_patch(_replace('"jump _setimage+0x1a4"', '"return -1"'))
    with pytest.raises(GuardError, match=r"^then: 'return' is only possible at a function's entry"):
        Toolchain().body_source(patch.patchlets[0], at_entry=False)
    Toolchain().body_source(patch.patchlets[0], at_entry=True)
    c = patch.patchlets[2]
    with pytest.raises(CCompileError, match=r"^c: MP_BLOCKED needs a blocked-event counter"):
        Toolchain().body_source(c, at_entry=True)


def test_v0_sources_still_parse() -> None:
    v0 = V1.replace("cves = [", "#").replace('author = "', "#").replace('arch = "x86_64"', "")
    v0 = v0[: v0.index('[[patchlet]]\nat = "copy_packet"')]
    v0 = v0[: v0.index("[[patchlet]]")] + v0[v0.index('[[patchlet]]\nat = "check_len"') :]
    patch = parse_patch(v0)
    assert [p.code for p in patch.patchlets] == ["cmp esi, 64\n"]


# Bodies are compiled by the toolchain (as `build` does), never when a source is
# validated: parsing succeeds, and the toolchain names the patchlet and the problem.
BODY_ERRORS = [
    (
        "c does not compile",
        _replace("return MP_CONTINUE;", "return MP_CONTINUE"),
        r"patchlet\[2\] \(.*?\): c: does not compile \(cc\):\n    patchlet\.c: In function 'patchlet':\n"
        r"    patchlet\.c:\d+:\d+: error: expected ';' before '}' token",
    ),
    (
        "c uses data",
        _replace("mp_verdict patchlet", "int hits;\nmp_verdict patchlet"),
        r"patchlet\[2\] \(.*?\): c: defines `hits` in \.bss, which is writable",
    ),
]


@pytest.mark.parametrize(
    ("source", "expected"), [m[1:] for m in BODY_ERRORS], ids=[m[0] for m in BODY_ERRORS]
)
def test_body_errors_found_by_the_toolchain(source: str, expected: str) -> None:
    patch = parse_patch(source, "v1.toml")
    with pytest.raises(PatchFormatError) as err:
        Toolchain().check(patch)
    assert re.search(expected, str(err.value)), str(err.value)
