"""The examples in docs/patch-format.md must keep working."""

from __future__ import annotations

import re
from pathlib import Path

from micropatch.bodies.assemble import assemble
from micropatch.bodies.cbody import HEADER
from micropatch.bodies.cwrapper import REGS
from micropatch.bodies.toolchain import Toolchain
from micropatch.patch.asmtext import references
from micropatch.patch.source import parse_patch

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


def test_every_toml_example_parses() -> None:
    """The fragments (only [[patchlet]] tables) are checked under the complete
    example's [patch] and [target]: guards parse, C compiles."""
    blocks = re.findall(r"```toml\n(.*?)```", DOC, re.S)
    assert len(blocks) >= 5
    header = blocks[0][: blocks[0].index("[[patchlet]]")]
    kinds = set()
    for block in blocks[1:]:
        patch = parse_patch(header + block, "patch-format.md")
        kinds |= {p.kind for p in patch.patchlets}
        for patchlet in patch.patchlets:
            Toolchain().body_source(patchlet, at_entry=True)
    assert kinds == {"guard", "c"}


def test_mp_regs_in_docs_matches_the_header() -> None:
    documented = re.search(r"struct mp_regs \{.*?\};", DOC, re.S)
    shipped = re.search(r"struct mp_regs \{.*?\};", HEADER.read_text(), re.S)
    assert documented is not None and shipped is not None
    fields = [
        re.findall(r"\b(r\w+)\b", m.group(0).replace("mp_regs", "")) for m in (documented, shipped)
    ]
    assert fields[0] == fields[1] == list(REGS)
