from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropatch.bodies.toolchain import Toolchain
from micropatch.errors import PatchFormatError
from micropatch.patch.model import Patch, PatchInfo, Patchlet, Target
from micropatch.patch.source import load_patch, parse_patch

VALID = '''
[patch]
id = "demo-length-check"
version = 2
title = "Reject oversized packets"
description = "CVE-0000-0000"

[target]
module = "vulnerable"
build_id = "4F0C9A"
sha256 = "9A1B000000000000000000000000000000000000000000000000000000000000"

[[patchlet]]
at = "parse_packet+0x12"
expect = "48 89 e5 8b47 08"
code = """
cmp edx, 64          # the largest valid length
ja {parse_packet_error}
"""

[[patchlet]]
at = "0x1234"
code = ""
resume = "parse_packet_error+4"
check_branches = false
'''


def test_valid_source() -> None:
    patch = parse_patch(VALID, "demo.toml")
    assert patch == Patch(
        info=PatchInfo(
            id="demo-length-check",
            version=2,
            title="Reject oversized packets",
            description="CVE-0000-0000",
        ),
        target=Target(module="vulnerable", build_id="4f0c9a", sha256="9a1b" + "0" * 60),
        patchlets=(
            Patchlet(
                at="parse_packet+0x12",
                expect=bytes.fromhex("4889e58b4708"),
                code="cmp edx, 64          # the largest valid length\nja {parse_packet_error}\n",
            ),
            Patchlet(at="0x1234", code="", resume="parse_packet_error+4", check_branches=False),
        ),
    )
    assert (patch.id, patch.version) == ("demo-length-check", 2)
    assert patch.patchlets[0].resume == "after" and patch.patchlets[0].check_branches


def test_round_trip_through_plain_data() -> None:
    patch = parse_patch(VALID)
    data = patch.model_dump(by_alias=True, mode="json")
    assert data["patchlet"][0]["expect"] == "48 89 e5 8b 47 08"
    assert Patch.model_validate(data) == patch


def test_model_is_frozen() -> None:
    patch = parse_patch(VALID)
    with pytest.raises(ValueError):
        patch.info.id = "other"  # type: ignore[misc]


def test_load_patch(tmp_path: Path) -> None:
    path = tmp_path / "demo.toml"
    path.write_text(VALID)
    assert load_patch(path) == parse_patch(VALID)
    with pytest.raises(PatchFormatError, match=r"absent\.toml: cannot read patch source"):
        load_patch(tmp_path / "absent.toml")


def _without_second_patchlet(text: str) -> str:
    return text[: text.index('[[patchlet]]\nat = "0x1234"')]


MALFORMED = [
    # (name, source, expected message pattern)
    (
        "bad toml",
        VALID.replace("version = 2", "version = "),
        r"demo\.toml: invalid TOML at line 4, column 11: invalid value",
    ),
    (
        "missing id",
        VALID.replace('id = "demo-length-check"\n', ""),
        r"demo\.toml: patch\.id: required field is missing",
    ),
    (
        "bad id chars",
        VALID.replace('"demo-length-check"', '"Demo Check!"'),
        r"patch\.id: 'Demo Check!' is not a valid id: use 1 to 64 lowercase letters",
    ),
    (
        "version 0",
        VALID.replace("version = 2", "version = 0"),
        r"patch\.version: must be at least 1, got 0",
    ),
    (
        "version past 63 bits",
        VALID.replace("version = 2", "version = 9223372036854775808"),
        r"patch\.version: must be at most 9223372036854775807, got 9223372036854775808",
    ),
    (
        "version string",
        VALID.replace("version = 2", 'version = "2"'),
        r"patch\.version: must be an integer, got the string '2'",
    ),
    (
        "no target identity",
        re.sub(r"(build_id|sha256) = .*\n", "", VALID),
        r"target: at least one of build_id or sha256 is required",
    ),
    (
        "bad hex in expect",
        VALID.replace("48 89 e5", "48 8g e5"),
        r"patchlet\[0\]\.expect: '48 8g e5 8b47 08' is not a byte string",
    ),
    (
        "odd hex in expect",
        VALID.replace("48 89 e5", "48 89 e"),
        r"patchlet\[0\]\.expect: .* expected pairs of hex digits",
    ),
    (
        "unknown field",
        VALID.replace("title =", "titel ="),
        r"patch\.titel: unknown field \(allowed: id, version, title, description, cves, author\); "
        r"did you mean 'title'\?",
    ),
    (
        "unknown table",
        VALID.replace("[target]", "[targte]"),
        r"2 problems:\n  target: the \[target\] table is required\n"
        r"  targte: unknown field .*did you mean 'target'\?",
    ),
    (
        "no patchlets",
        VALID[: VALID.index("[[patchlet]]")],
        r"demo\.toml: patchlet: at least one \[\[patchlet\]\] table is required",
    ),
    (
        "bad at syntax",
        VALID.replace('"parse_packet+0x12"', '"parse_packet-0x12"'),
        r"patchlet\[0\]\.at: 'parse_packet-0x12' is not a location: expected 'symbol', "
        r"'symbol\+0xN', '0xN' \(a module offset\) or 'module!symbol'",
    ),
    (
        "unterminated string",
        VALID + 'title = "',
        r"demo\.toml: invalid TOML at the end: unterminated string",
    ),
    (
        "bad resume location",
        VALID.replace('"parse_packet_error+4"', '"error path"'),
        r"patchlet\[1\]\.resume: 'error path' is not a location",
    ),
    (
        "bad reference",
        VALID.replace("{parse_packet_error}", "{parse packet error}"),
        r"patchlet\[0\]\.code: reference \{parse packet error\}: 'parse packet error' is not",
    ),
    (
        "unmatched brace",
        VALID.replace("{parse_packet_error}", "{parse_packet_error"),
        r"patchlet\[0\]\.code: line 2 .*unmatched '\{'",
    ),
    (
        "duplicate site",
        VALID.replace('at = "0x1234"', 'at = "parse_packet+18"'),
        r"patchlet\[1\] and patchlet\[0\] are both at 'parse_packet\+18'",
    ),
    (
        "module with directory",
        VALID.replace('"vulnerable"', '"/usr/bin/vulnerable"'),
        r"target\.module: '/usr/bin/vulnerable' is not a module file name",
    ),
    (
        "short sha256",
        VALID.replace('"9A1B' + "0" * 60 + '"', '"9a1b"'),
        r"target\.sha256: '9a1b' is not a SHA-256: expected 64 hex digits",
    ),
    (
        "check_branches not bool",
        VALID.replace("check_branches = false", 'check_branches = "no"'),
        r"patchlet\[1\]\.check_branches: must be true or false, got the string 'no'",
    ),
    (
        "patch is not a table",
        VALID.replace("[patch]\n", "patch = 1\n[x]\n"),
        r"patch: must be a table, got the integer 1",
    ),
    (
        "code missing",
        _without_second_patchlet(VALID).replace("code = ", "cod = "),
        r"patchlet\[0\]\.code: required field is missing",
    ),
]


@pytest.mark.parametrize(
    ("source", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed(source: str, expected: str) -> None:
    with pytest.raises(PatchFormatError) as err:
        parse_patch(source, "demo.toml")
    message = str(err.value)
    assert message.startswith("demo.toml: ")
    assert re.search(expected, message), message


def test_not_utf8() -> None:
    with pytest.raises(PatchFormatError, match=r"x\.toml: not UTF-8 text"):
        parse_patch(b'[patch]\nid = "\xff"\n', "x.toml")


def test_deeply_nested_toml() -> None:
    with pytest.raises(PatchFormatError, match="invalid TOML"):
        parse_patch("a = " + "[" * 100_000)


@settings(max_examples=300)
@given(st.text())
def test_arbitrary_text_raises_only_patch_format_error(text: str) -> None:
    with contextlib.suppress(PatchFormatError):
        parse_patch(text)


@settings(max_examples=200)
@given(st.binary())
def test_arbitrary_bytes_raise_only_patch_format_error(data: bytes) -> None:
    with contextlib.suppress(PatchFormatError):
        parse_patch(data)


# TOML documents built from random values, shaped like patches often enough
# to reach the model's validators rather than only the TOML parser.
_FIELDS = [
    "id",
    "version",
    "title",
    "module",
    "build_id",
    "sha256",
    "at",
    "expect",
    "code",
    "resume",
    "check_branches",
    "bogus",
]
_scalars = (
    st.text(max_size=20)
    | st.sampled_from(["demo", "0x10", "f+1", "48 89", "nop", "jmp {f}", "after", "ab" * 32])
    | st.integers(-5, 2**63 - 1)
    | st.booleans()
    | st.floats()
)
_values = _scalars | st.lists(_scalars, max_size=3)
_tables = st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=6)

BASE = {
    "patch": {"id": "demo", "version": 1},
    "target": {"module": "vulnerable", "build_id": "4f0c"},
    "patchlet": [{"at": "f+0x12", "expect": "48 89 e5", "code": "cmp edx, 64\nja {f_error}"}],
}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        escaped = "".join(
            c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}"
            for c in value
            if not 0xD800 <= ord(c) <= 0xDFFF
        )
        return f'"{escaped}"'
    assert isinstance(value, list)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def _toml(document: dict[str, object]) -> str:
    lines = []
    for name, body in document.items():
        for table in body if isinstance(body, list) else [body]:
            assert isinstance(table, dict)
            lines.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines)


def test_base_document_is_valid() -> None:
    assert parse_patch(_toml(BASE)).patchlets[0].expect == bytes.fromhex("4889e5")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    patch=_tables,
    target=_tables,
    patchlets=st.lists(_tables, max_size=3),
    drop=st.sets(st.sampled_from(["patch", "target"])),
)
def test_random_documents_raise_only_patch_format_error(
    patch: dict[str, object],
    target: dict[str, object],
    patchlets: list[dict[str, object]],
    drop: set[str],
) -> None:
    document: dict[str, object] = {"patch": patch, "target": target, "patchlet": patchlets}
    for name in drop:
        del document[name]
    with contextlib.suppress(PatchFormatError):
        parse_patch(_toml(document))


@settings(max_examples=400)
@given(
    where=st.sampled_from(
        [("patch", f) for f in ("id", "version", "title", "bogus")]
        + [("target", f) for f in ("module", "build_id", "sha256")]
        + [("patchlet", f) for f in ("at", "expect", "code", "resume", "check_branches")]
    ),
    value=_values,
)
def test_one_bad_field_raises_only_patch_format_error(
    where: tuple[str, str], value: object
) -> None:
    section, field = where
    document = {
        "patch": dict(BASE["patch"]),
        "target": dict(BASE["target"]),
        "patchlet": [dict(BASE["patchlet"][0])],
    }
    table = document[section][0] if section == "patchlet" else document[section]
    table[field] = value
    try:
        parse_patch(_toml(document))
    except PatchFormatError as exc:
        assert str(exc).startswith("<string>: ")


# Bodies are compiled by the toolchain (as `build` does), never when a source is
# validated: parsing succeeds, and the toolchain names the patchlet and the problem.
BODY_ERRORS = [
    (
        "bad assembly",
        VALID.replace("cmp edx, 64", "cmpq edx, 64"),
        r"patchlet\[0\] \(.*?\): line 1 \('cmpq edx, 64 .*'\): invalid mnemonic",
    ),
]


@pytest.mark.parametrize(
    ("source", "expected"), [m[1:] for m in BODY_ERRORS], ids=[m[0] for m in BODY_ERRORS]
)
def test_body_errors_found_by_the_toolchain(source: str, expected: str) -> None:
    patch = parse_patch(source, "demo.toml")
    with pytest.raises(PatchFormatError) as err:
        Toolchain().check(patch)
    assert re.search(expected, str(err.value)), str(err.value)
