"""The artifact the artifact tests load, tamper with and admit: built once per test module."""

from __future__ import annotations

import pytest

from micropatch.build.artifact import build
from micropatch.trust.artifact import Artifact

from .artifacts import FIX, NOW, source, write_source


@pytest.fixture(scope="module")
def built(targets, tmp_path_factory) -> Artifact:
    path = write_source(tmp_path_factory.mktemp("src"), source(targets.vuln_pie, [FIX]))
    return build(path, targets.vuln_pie, now=NOW)
