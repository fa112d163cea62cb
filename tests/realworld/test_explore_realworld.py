"""explore on the modules of the real-world patches: the functions they patch
are found (named, or hinted when stripped) and their sites reported valid,
with the patch's own `expect` bytes."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest

from micropatch.tools.analysis import ModuleAnalysis
from micropatch.tools.explore import list_entries, show
from micropatch.tools.xref import xref

from .wheels import module_index, wheel_member

pytestmark = pytest.mark.realworld

PATCHES = Path(__file__).resolve().parents[2] / "patches"
PILLOW = ("pillow==12.1.0", "PIL/_imaging.cpython-311-x86_64-linux-gnu.so")
LXML = ("lxml==6.0.0", "lxml/etree.cpython-311-x86_64-linux-gnu.so")


def _module(requirement: str, member: str, patch: str) -> tuple[ModuleAnalysis, dict]:  # type: ignore[type-arg]
    source = tomllib.loads((PATCHES / patch / "patch.toml").read_text())
    path = wheel_member(requirement, member)
    if hashlib.sha256(path.read_bytes()).hexdigest() != source["target"]["sha256"]:
        pytest.skip(f"pip picked another build of {requirement} than the patch's")
    return module_index(requirement, member), source


@pytest.fixture(scope="module")
def pillow() -> tuple[ModuleAnalysis, dict]:  # type: ignore[type-arg]
    return _module(*PILLOW, "pillow-CVE-2026-25990")


@pytest.fixture(scope="module")
def lxml() -> tuple[ModuleAnalysis, dict]:  # type: ignore[type-arg]
    return _module(*LXML, "lxml-CVE-2025-49796")


def _check_sites(index: ModuleAnalysis, source: dict) -> None:  # type: ignore[type-arg]
    for patchlet in source["patchlet"]:
        offset = int(patchlet["at"], 16)
        shown = show(index, hex(offset))
        line = next(line for line in shown.lines if line.offset == offset)
        assert line.site.valid, line.site.reason
        assert line.site.expect == patchlet["expect"]


def test_pillow_setimage_functions_and_sites(pillow: tuple[ModuleAnalysis, dict]) -> None:  # type: ignore[type-arg]
    index, source = pillow
    entries = {e.function.start: e.function for e in list_entries(index)}
    assert (entries[0x1B870].name, entries[0x1B870].end) == ("_setimage", 0x1B870 + 439)
    assert (entries[0x1CD00].name, entries[0x1CD00].end) == ("_setimage", 0x1CD00 + 423)
    _check_sites(index, source)
    _, hits = xref(index, "tile cannot extend outside image")
    assert {h.function.start for h in hits} == {0x1B870, 0x1CD00}
    shown = show(index, "0x1b935")
    assert {"PyExc_ValueError", "PyErr_SetString"} <= {r.name for r in shown.references}


def test_lxml_schematron_function_is_hinted_and_its_sites_valid(
    lxml: tuple[ModuleAnalysis, dict],
) -> None:  # type: ignore[type-arg]
    index, source = lxml
    entries = {e.function.start: e for e in list_entries(index)}
    entry = entries[0x2AAE30]
    assert entry.function.name is None and entry.function.end == 0x2AB54A
    assert entry.function.source == "eh_frame"
    # the strings the README located it by: the rarest ones come first in the hint
    assert "Unsupported XPATH Type\n" in entry.strings
    assert "xmlGetNoNsProp" in entry.imports or "xmlGetLineNo" in entry.imports
    _check_sites(index, source)
    shown = show(index, "0x2ab530")
    called = {r.name for r in shown.references if r.kind == "import"}
    assert {"xmlXPathFreeObject", "xmlXPathEval", "xmlGetNoNsProp", "xmlStrcat"} <= called
    _, hits = xref(index, "Unsupported XPATH Type")
    assert 0x2AAE30 in {h.function.start for h in hits}
    _, hits = xref(index, "xmlXPathFreeObject")
    assert 0x2AAE30 in {h.function.start for h in hits}
