"""The examples in docs/patch-format.md must keep working."""

from __future__ import annotations

import re
from pathlib import Path

from micropatch.patch import assemble, parse_patch, references

DOC = (Path(__file__).parents[3] / "docs" / "patch-format.md").read_text()


def test_complete_example_parses() -> None:
    source = re.search(r"```toml\n(.*?)```", DOC, re.S)
    assert source is not None
    patch = parse_patch(source.group(1), "patch-format.md")
    assert patch.id == "demo-length-check" and len(patch.patchlets) == 2


def test_reference_example_assembles() -> None:
    code = re.search(r"```asm\n(.*?)```", DOC, re.S)
    assert code is not None
    assert references(code.group(1)) == [
        "parse_packet_error",
        "log_packet",
        "g_limit",
        "g_table+0x10",
        "g_table",
    ]
    assert assemble(code.group(1), 0x7F00_0010_0000, lambda _: 0x7F00_0000_1000)
