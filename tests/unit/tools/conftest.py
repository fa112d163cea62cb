"""Builds of tests/targets/explore.c and diffpair.c, once per session, with the
machine's cc and strip: the variants the explore and diff tests read."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from targets.harness import PIE, SOURCE_DIR, elf_symbol

FLAGS = ("-g", "-Wall", "-Werror", "-fno-stack-protector", "-fcf-protection=none")
NO_PIE = ("-fno-pie", "-no-pie")


@dataclass(frozen=True)
class Build:
    """One variant: `path` is what the test reads, `symbols` the same code unstripped."""

    path: Path
    symbols: Path

    def offset(self, name: str) -> tuple[int, int]:
        """[start, end) module offsets of function `name`, from the unstripped twin."""
        symbol = elf_symbol(self.symbols, name)
        return symbol.offset, symbol.offset + symbol.size


def _tool(name: str) -> str:
    found = shutil.which(os.environ.get(name.upper(), name))
    if found is None:
        pytest.skip(f"{name} not found: install binutils/gcc")
    return found


def _build(out: Path, source: str, flags: tuple[str, ...], strip: bool, name: str) -> Build:
    cc, strip_tool = _tool("cc"), _tool("strip")
    full = out / f"{name}.full"
    done = subprocess.run(
        [cc, *FLAGS, *flags, "-o", str(full), str(SOURCE_DIR / source)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"building {name} failed:\n{done.stderr}")
    if not strip:
        return Build(full, full)
    stripped = out / name
    subprocess.run([strip_tool, "-o", str(stripped), str(full)], check=True, capture_output=True)
    return Build(stripped, full)


EXPLORE_VARIANTS = {
    "pie": ((*PIE, "-O2", "-rdynamic"), False),
    "pie-stripped": ((*PIE, "-O2", "-rdynamic"), True),
    "nopie": ((*NO_PIE, "-O2", "-rdynamic"), False),
    "nopie-stripped": ((*NO_PIE, "-O2", "-rdynamic"), True),
}


@pytest.fixture(scope="session")
def explore_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Build]:
    """explore.c as PIE and non-PIE, with and without symbols."""
    out = tmp_path_factory.mktemp("explore")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(_build, out, "explore.c", flags, strip, name)
            for name, (flags, strip) in EXPLORE_VARIANTS.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="session")
def diff_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Build, Build]]:
    """diffpair.c without and with -DFIXED, at -O0 and -O2, stripped: (old, new) by level."""
    out = tmp_path_factory.mktemp("diffpair")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            (level, fixed): pool.submit(
                _build,
                out,
                "diffpair.c",
                (*PIE, f"-{level}", *(("-DFIXED",) if fixed else ())),
                True,
                f"diffpair-{level}-{'new' if fixed else 'old'}",
            )
            for level in ("O0", "O2")
            for fixed in (False, True)
        }
        return {
            level: (futures[(level, False)].result(), futures[(level, True)].result())
            for level in ("O0", "O2")
        }
