"""Small C programs and libraries built with the machine's cc, once per session,
and the binutils views (readelf, nm) the tests compare against."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

PROGRAM = r"""
#include <stdio.h>

int g_limit = 64;
int g_counter;

__attribute__((noinline)) int parse_packet(const char *p, int n)
{
    if (n > g_limit)
        return -1;
    g_counter++;
    return p[0] + n;
}

static int fast_impl(int x) { return x + 1; }
static int (*resolve_fast(void))(int) { return fast_impl; }
int fast(int x) __attribute__((ifunc("resolve_fast")));

int use_a(int x);
int use_b(int x);

int main(int argc, char **argv)
{
    printf("%d %d %d\n", parse_packet(argv[0], argc), fast(argc), use_a(argc) + use_b(argc));
    return 0;
}
"""

# Two translation units with a static function of the same name.
DUP = r"""
static __attribute__((noinline, noclone, used)) int dup(int x) { return x * %d + 7; }
int use_%s(int x) { return dup(x) + 1; }
"""

LIBRARY = r"""
int api_v1(int x) { return x + 1; }
int api_v2(int x) { return x * 2 + 3; }
int exported(int x) { return api_v2(x) - 1; }
__asm__(".symver api_v1, api@VERS_1");
__asm__(".symver api_v2, api@@VERS_2");
"""

VERSION_SCRIPT = """
VERS_1 { global: api; exported; local: *; };
VERS_2 { global: api; } VERS_1;
"""


@dataclass(frozen=True)
class Built:
    pie: Path
    nopie: Path
    pie_stripped: Path
    nopie_stripped: Path
    nounwind: Path
    nounwind_stripped: Path
    no_build_id: Path
    library: Path
    library_stripped: Path
    object_file: Path


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None or shutil.which("strip") is None:
        pytest.skip("needs a C compiler and binutils")
    d = tmp_path_factory.mktemp("elf")
    (d / "prog.c").write_text(PROGRAM)
    (d / "dup_a.c").write_text(DUP % (3, "a"))
    (d / "dup_b.c").write_text(DUP % (5, "b"))
    (d / "lib.c").write_text(LIBRARY)
    (d / "lib.map").write_text(VERSION_SCRIPT)
    sources = [str(d / n) for n in ("prog.c", "dup_a.c", "dup_b.c")]

    def cc_run(*args: str) -> None:
        subprocess.run([cc, "-O2", *args], check=True, cwd=d)

    def strip(src: Path, dst: str) -> Path:
        subprocess.run(["strip", "-o", str(d / dst), str(src)], check=True)
        return d / dst

    cc_run("-fPIE", "-pie", "-o", "pie", *sources)
    cc_run("-no-pie", "-o", "nopie", *sources)
    no_unwind = ("-fno-asynchronous-unwind-tables", "-fno-unwind-tables")
    cc_run("-fPIE", "-pie", *no_unwind, "-o", "nounwind", *sources)
    cc_run("-fPIE", "-pie", "-Wl,--build-id=none", "-o", "no_build_id", *sources)
    cc_run("-shared", "-fPIC", "-Wl,--version-script=lib.map", "-o", "libver.so", "lib.c")
    cc_run("-c", "-o", "prog.o", str(d / "prog.c"))
    return Built(
        pie=d / "pie",
        nopie=d / "nopie",
        pie_stripped=strip(d / "pie", "pie.stripped"),
        nopie_stripped=strip(d / "nopie", "nopie.stripped"),
        nounwind=d / "nounwind",
        nounwind_stripped=strip(d / "nounwind", "nounwind.stripped"),
        no_build_id=d / "no_build_id",
        library=d / "libver.so",
        library_stripped=strip(d / "libver.so", "libver.stripped.so"),
        object_file=d / "prog.o",
    )


def readelf_build_id(path: Path) -> str | None:
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", out)
    return match.group(1) if match else None


def lowest_load_vaddr(path: Path) -> int:
    out = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True).stdout
    loads = [line.split() for line in out.splitlines() if line.split()[:1] == ["LOAD"]]
    return min(int(fields[2], 16) for fields in loads)


def nm_symbols(path: Path, *extra: str) -> dict[str, tuple[int, int, str]]:
    """name -> (value, size, type letter) for defined symbols, as nm prints them."""
    out = subprocess.run(
        ["nm", "-S", "--defined-only", *extra, str(path)], capture_output=True, text=True
    ).stdout
    symbols = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 4:
            symbols[fields[3]] = (int(fields[0], 16), int(fields[1], 16), fields[2])
        elif len(fields) == 3:
            symbols[fields[2]] = (int(fields[0], 16), 0, fields[1])
    return symbols


def section(path: Path, name: str) -> tuple[int, int, int]:
    """(address, file offset, size) of a section, from readelf -S."""
    out = subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        fields = line.replace("[ ", "[").split()
        if len(fields) > 5 and fields[1] == name:
            return int(fields[3], 16), int(fields[4], 16), int(fields[5], 16)
    raise LookupError(name)
