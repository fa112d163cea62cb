"""A bounded atheris run over the source parser and the artifact loader, seeded with
real inputs: only MicropatchError subclasses may escape (see fuzz/fuzz_inputs.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from micropatch.build.artifact import build as build_artifact
from micropatch.trust.keys import generate_key

from .patching import patch_source

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[2]
RUNS = 10_000


def fuzz(target: str, corpus: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "fuzz_inputs.py"), target, str(corpus),
         f"-atheris_runs={RUNS}", "-max_len=4096"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
    assert done.returncode == 0, tail
    # "Done 10000 in 12 second(s)": every run was made (libFuzzer says "Done N runs in")
    assert re.search(rf"^Done {RUNS} (runs )?in ", done.stderr, re.MULTILINE), tail


def test_fuzz_source_parser(tmp_path):
    corpus = tmp_path / "source"
    corpus.mkdir()
    for i, toml in enumerate(sorted((ROOT / "patches").glob("*/patch.toml"))):
        (corpus / f"seed{i}").write_bytes(toml.read_bytes())
    fuzz("source", corpus)


def test_fuzz_artifact_loader(targets, tmp_path):
    corpus = tmp_path / "artifact"
    corpus.mkdir()
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [{"at": "copy_packet", "code": "nop"}]))
    built = build_artifact(source, targets.vuln_pie)
    (corpus / "unsigned").write_bytes(built.to_bytes())
    (corpus / "signed").write_bytes(built.signed(generate_key("fuzz")).to_bytes())
    fuzz("artifact", corpus)
