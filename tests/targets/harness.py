"""Build the C test targets and drive them over their line protocol.

Every target prints ``ready <pid>`` once it is set up, then answers each
command line on stdin with exactly one line on stdout; ``quit`` answers ``bye``
and exits 0, and so does EOF on stdin.  The C sources document, at their top,
the function meant to be patched, its instructions as this machine's gcc 12
emits them, and the sites the tests use; ``SITES`` below holds the same sites
as data, checked by ``tests/integration/test_targets.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

SOURCE_DIR = Path(__file__).resolve().parent

# -g does not change the code.  The -f flags are this Debian gcc's defaults,
# spelled out so that a distribution enabling stack protectors, CET (endbr64)
# or frame pointers by default does not move the documented sites.
CFLAGS = (
    "-O2",
    "-g",
    "-Wall",
    "-Werror",
    "-pthread",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fomit-frame-pointer",
    "-Wl,--build-id=sha1",
)
PIE = ("-fPIE", "-pie")
NO_PIE = ("-fno-pie", "-no-pie")


@dataclass(frozen=True)
class Artifact:
    """One program or library built from tests/targets/."""

    name: str
    output: str
    sources: tuple[str, ...]
    flags: tuple[str, ...] = PIE
    libs: tuple[str, ...] = ()  # after the sources, where the linker wants them
    needs: tuple[str, ...] = ()  # artifacts to build first


ARTIFACTS: tuple[Artifact, ...] = (
    Artifact("vuln_pie", "vuln_pie", ("vuln.c", "vuln_fn.c", "proto.c")),
    Artifact("vuln_nopie", "vuln_nopie", ("vuln.c", "vuln_fn.c", "proto.c"), NO_PIE),
    Artifact("libvuln", "libvuln.so", ("vuln_fn.c",), ("-fPIC", "-shared")),
    Artifact(
        "vuln_lib_main",
        "vuln_lib_main",
        ("vuln.c", "proto.c"),
        (*PIE, "-Wl,-rpath,$ORIGIN"),
        libs=("-L{out}", "-lvuln"),
        needs=("libvuln",),
    ),
    Artifact("threads", "threads", ("threads.c", "compute_fn.c", "workers.c", "proto.c")),
    Artifact("redzone", "redzone", ("redzone.c", "redzone_fn.c", "proto.c")),
    Artifact("reloc", "reloc", ("reloc.c", "reloc_asm.S", "proto.c")),
    Artifact("blocker", "blocker", ("blocker.c", "vuln_fn.c", "proto.c")),
    Artifact("forker", "forker", ("forker.c", "vuln_fn.c", "proto.c")),
    Artifact("twofuncs", "twofuncs", ("twofuncs.c", "twofuncs_a.c", "twofuncs_b.c", "proto.c")),
    Artifact("branchy", "branchy", ("branchy.c", "branchy_asm.S", "proto.c")),
    Artifact("seccomp", "seccomp", ("seccomp.c", "vuln_fn.c", "proto.c")),
    Artifact("spinner", "spinner", ("spinner.c", "spinner_asm.S", "workers.c", "proto.c")),
    Artifact("waiters", "waiters", ("waiters.c", "vuln_fn.c", "proto.c")),
    Artifact("frame", "frame", ("frame.c", "frame_asm.S", "proto.c")),
)


@dataclass(frozen=True)
class Site:
    """A documented site: ``length`` bytes at ``function + offset`` in ``target``.

    ``valid`` is False for sites an engine must refuse (a branch lands inside,
    or the site runs past the end of the function).
    """

    target: str
    function: str
    offset: int
    length: int
    valid: bool
    code: str  # hex prefix of the site's bytes as gcc 12 / GNU as emit them here
    note: str = ""


SITES: tuple[Site, ...] = (
    # vuln / libvuln / blocker / forker / seccomp: copy_packet(buf, len)
    Site(
        "vuln_pie",
        "copy_packet",
        0x0,
        8,
        True,
        "85f6 0f88ae000000",
        "test esi,esi; js near -> error path (return -1)",
    ),
    Site(
        "vuln_pie",
        "copy_packet",
        0x8,
        9,
        True,
        "83fe40 0f8f9f000000",
        "cmp esi,0x40; jg near -> 'would overflow' (return -2): the fix goes here",
    ),
    Site("vuln_pie", "copy_packet", 0x11, 7, True, "488d15", "lea rdx,[rip+packet_buf]"),
    Site("vuln_nopie", "copy_packet", 0x0, 8, True, "85f6 0f88a6000000"),
    Site("vuln_nopie", "copy_packet", 0x8, 9, True, "83fe40 0f8f97000000"),
    Site("libvuln", "copy_packet", 0x0, 8, True, "85f6 0f88ae000000"),
    Site("libvuln", "copy_packet", 0x8, 9, True, "83fe40 0f8f9f000000"),
    Site("blocker", "copy_packet", 0x8, 9, True, "83fe40 0f8f9f000000"),
    Site("forker", "copy_packet", 0x8, 9, True, "83fe40 0f8f9f000000"),
    Site("seccomp", "copy_packet", 0x8, 9, True, "83fe40 0f8f9f000000"),
    Site("waiters", "copy_packet", 0x8, 9, True, "83fe40 0f8f9f000000"),
    # threads: compute(x) = 2x + 1, the whole function is one site
    Site("threads", "compute", 0x0, 5, True, "8d443f01 c3", "lea eax,[rdi+rdi*1+0x1]; ret"),
    # redzone: rz_sum(n) = 14n + 91, locals at [rsp-0x78, rsp-0x8)
    Site("redzone", "rz_sum", 0x0, 9, True, "488d4701 48897c2488", "entry: red zone not yet live"),
    Site(
        "redzone",
        "rz_sum",
        0x7A,
        5,
        True,
        "488b442488",
        "all 14 red-zone slots live: two pushes clobber a[13] at [rsp-0x10]",
    ),
    Site(
        "redzone",
        "rz_sum",
        0xDF,
        5,
        True,
        "488b5424f0",
        "rax = a[0]+..+a[12]; a[13] still live at [rsp-0x10]",
    ),
    # frame: fr_scale(n) = 2n + 1001, a frame of 0x28 bytes, CFA rsp+0x30 at the site
    Site("frame", "fr_scale", 0x1A, 5, True, "488b7c2408", "mov rdi,[rsp+0x8]; then a call"),
    # reloc
    Site("reloc", "reloc_fn", 0x0, 6, True, "3b3d", "cmp edi,[rip+reloc_magic]"),
    Site("reloc", "reloc_fn", 0x0, 13, True, "3b3d", "rip-relative cmp + je short + call"),
    Site("reloc", "reloc_fn", 0x6, 7, True, "740c e8", "je short + call"),
    Site("reloc", "reloc_fn", 0x8, 5, True, "e8", "call reloc_helper"),
    Site("reloc", "reloc_rip", 0x0, 6, True, "8b05", "mov eax,[rip+reloc_base]"),
    Site(
        "reloc",
        "reloc_rip_imm",
        0x0,
        10,
        True,
        "813d",
        "cmp dword [rip+reloc_base],1000: imm32 after the disp32",
    ),
    Site("reloc", "reloc_jcc", 0x0, 7, True, "85ff 7404 8d04bf", "test edi,edi; je short; lea"),
    Site("reloc", "reloc_jcc", 0x2, 5, True, "7404 8d04bf", "je short first"),
    Site("reloc", "reloc_call", 0x0, 5, True, "e8", "call reloc_helper first"),
    Site("reloc", "reloc_jrcxz", 0x0, 7, True, "89f9 e304 8d4705", "mov ecx,edi; jrcxz; lea"),
    Site("reloc", "reloc_loop", 0x0, 9, True, "89f9 e206 b8faffffff", "mov ecx,edi; loop; mov"),
    # branchy: sum 1..n with a loop whose head is at +2
    Site(
        "branchy",
        "branchy",
        0x0,
        6,
        False,
        "31c0 85ff 7e06",
        "the loop head +2 is a branch target inside",
    ),
    Site("branchy", "branchy", 0x2, 6, True, "85ff 7e06 01f8", "starts at the loop head"),
    Site("branchy", "branchy", 0x4, 6, True, "7e06 01f8 ffcf"),
    Site("branchy", "branchy", 0x6, 6, True, "01f8 ffcf ebf6", "ends with the backward jmp"),
    Site("branchy", "branchy", 0x8, 5, False, "ffcf ebf6 c3", "the jle target +12 (ret) is inside"),
    # twofuncs
    Site("twofuncs", "check_a", 0x0, 6, True, "8d87e8030000", "lea eax,[rdi+0x3e8]"),
    Site("twofuncs", "check_b", 0x0, 7, True, "8d04fd00000000", "lea eax,[rdi*8+0x0]"),
    # spinner
    Site(
        "spinner",
        "hot",
        0x0,
        6,
        True,
        "89f8 f390 f390",
        "workers are most often stopped at +2/+4, inside this site",
    ),
    Site("spinner", "hot", 0x6, 5, True, "8d444001 c3", "lea eax,[rax+rax*2+1]; ret"),
    Site(
        "spinner",
        "stuck_read",
        0x0,
        5,
        True,
        "31c0 0f05 c3",
        "a 'stick' thread is blocked at +4 and restarts at +2, inside this site",
    ),
)


class BuildError(RuntimeError):
    """A target failed to compile."""


class Targets:
    """Paths of the built targets, one attribute per ``Artifact.name``."""

    vuln_pie: Path
    vuln_nopie: Path
    libvuln: Path
    vuln_lib_main: Path
    threads: Path
    redzone: Path
    reloc: Path
    blocker: Path
    forker: Path
    twofuncs: Path
    branchy: Path
    seccomp: Path
    spinner: Path
    waiters: Path
    frame: Path

    def __init__(self, directory: Path, paths: dict[str, Path]) -> None:
        self.dir = directory
        self.paths = dict(paths)
        for name, path in paths.items():
            setattr(self, name, path)

    def path(self, target: str | os.PathLike[str]) -> Path:
        """The path of an artifact given by name (``"vuln_pie"``) or path."""
        if isinstance(target, str) and target in self.paths:
            return self.paths[target]
        return Path(target)

    def symbol(self, target: str | os.PathLike[str], name: str) -> Symbol:
        """``name`` in the symbol table of ``target``, with its module offset."""
        return elf_symbol(self.path(target), name)

    def site_offset(self, site: Site) -> int:
        """The module offset of a documented site."""
        return self.symbol(site.target, site.function).offset + site.offset

    def code(self, target: str | os.PathLike[str], name: str, size: int | None = None) -> bytes:
        """The first ``size`` bytes (default: all) of function ``name`` in the file."""
        sym = self.symbol(target, name)
        return elf_read(self.path(target), sym.vaddr, sym.size if size is None else size)


def build_targets(out: Path, cc: str | None = None, jobs: int | None = None) -> Targets:
    """Compile every artifact into ``out`` (in parallel) and return their paths."""
    compiler = cc or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise BuildError(f"C compiler {compiler!r} not found: install gcc or set CC")
    out.mkdir(parents=True, exist_ok=True)
    futures: dict[str, Future[Path]] = {}

    def build(artifact: Artifact) -> Path:
        # Dependencies were submitted earlier, so they are running or done.
        for need in artifact.needs:
            futures[need].result()
        target = out / artifact.output
        sources = [str(SOURCE_DIR / s) for s in artifact.sources]
        libs = [f.replace("{out}", str(out)) for f in artifact.libs]
        soname = [f"-Wl,-soname,{artifact.output}"] if "-shared" in artifact.flags else []
        cmd = [compiler, *CFLAGS, *artifact.flags, *soname, "-o", str(target), *sources, *libs]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(
                f"building {artifact.name} failed (exit {done.returncode}):\n"
                f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}"
            )
        return target

    # Libraries first: a job waits for its needs, which must already be queued.
    ordered = sorted(ARTIFACTS, key=lambda a: len(a.needs))
    with ThreadPoolExecutor(max_workers=jobs or min(8, os.cpu_count() or 1)) as pool:
        for artifact in ordered:
            futures[artifact.name] = pool.submit(build, artifact)
        paths = {name: f.result() for name, f in futures.items()}
    return Targets(out, paths)


@dataclass(frozen=True)
class Symbol:
    """A symbol of an ELF file; ``offset`` is relative to the module's load base."""

    name: str
    vaddr: int
    offset: int
    size: int


def _load_base(elf: ELFFile) -> int:
    """Lowest PT_LOAD address, page-aligned: 0 for PIE and shared objects."""
    loads = [s["p_vaddr"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    return min(loads) & ~0xFFF


def elf_symbol(path: Path, name: str) -> Symbol:
    """Look ``name`` up in .symtab (then .dynsym) of the file at ``path``."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        base = _load_base(elf)
        for section_name in (".symtab", ".dynsym"):
            section = elf.get_section_by_name(section_name)
            if not isinstance(section, SymbolTableSection):
                continue
            for sym in section.get_symbol_by_name(name) or ():
                if sym["st_shndx"] != "SHN_UNDEF":
                    value = sym["st_value"]
                    return Symbol(name, value, value - base, sym["st_size"])
    raise KeyError(f"symbol {name!r} not defined in {path}")


def elf_read(path: Path, vaddr: int, size: int) -> bytes:
    """``size`` bytes of the file image at virtual address ``vaddr``."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            start = seg["p_vaddr"]
            if (
                seg["p_type"] == "PT_LOAD"
                and start <= vaddr
                and vaddr + size <= start + seg["p_filesz"]
            ):
                f.seek(seg["p_offset"] + vaddr - start)
                return f.read(size)
    raise ValueError(f"{size} bytes at {vaddr:#x} are not in a loaded segment of {path}")


# Driving a started target: targets/driver.py (imported from here, as before).
from targets.driver import StartTarget, Target, TargetError  # noqa: E402, F401
