"""C bodies: a patchlet written as a C function, compiled by the machine's cc.

The function receives the saved registers (`struct mp_regs`, micropatch.h)
and returns a verdict: continue, return a value, or jump to one of the
patchlet's `jumps`. It is compiled to an object, its code and read-only data
sections are laid out in one blob and linked here (only PC-relative
references between them are allowed; writable data, the GOT and outside
symbols are refused), and a wrapper written in assembly saves the registers,
calls it on an aligned stack, takes the registers back and acts on the verdict.

The blob is position independent, so it is compiled once per source text and
embedded in the wrapper with `.byte` lines wherever the trampoline lands.
"""

from __future__ import annotations

import functools
import io
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import Section, Symbol, SymbolTableSection

from micropatch.errors import AssemblyError
from micropatch.patch.guard import AT_ENTRY_ONLY, RED_ZONE

HEADER = Path(__file__).with_name("micropatch.h")
ENTRY = "patchlet"

# The order of struct mp_regs in micropatch.h, lowest address first.
REGS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rflags",
)  # fmt: skip
_SLOT = {name: 8 * i for i, name in enumerate(REGS)}
_FRAME = 8 * len(REGS)
ARITHMETIC_FLAGS = 0x8D5  # CF PF AF ZF SF OF: what the C code may change in rflags
KIND_CONTINUE, KIND_RETURN, KIND_JUMP = 0, 1, 2

CFLAGS = (
    "-O2",
    "-std=gnu11",
    "-fPIC",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-stack-protector",
    "-ffreestanding",
    "-nostdlib",
    "-fcf-protection=none",
    "-mno-red-zone",
    # The trampoline saves the general registers only: no SSE/AVX in patchlets.
    "-mgeneral-regs-only",
    # Keep everything in .text, reached PC-relatively: no switch tables in
    # .rodata, no cold parts in .text.unlikely, no GOT for own functions.
    "-fno-jump-tables",
    "-fno-reorder-blocks-and-partition",
    "-fvisibility=hidden",
    "-fno-tree-loop-distribute-patterns",  # no memset/memcpy calls made up by gcc
    "-fno-exceptions",
    "-Werror=implicit-function-declaration",
    "-Werror=return-type",
    "-Werror=int-conversion",
    "-Werror=incompatible-pointer-types",
)
COMPILE_TIMEOUT = 60.0
_SHOWN_LINES = 20

_R_X86_64 = {
    1: "R_X86_64_64",
    2: "R_X86_64_PC32",
    4: "R_X86_64_PLT32",
    9: "R_X86_64_GOTPCREL",
    10: "R_X86_64_32",
    11: "R_X86_64_32S",
    24: "R_X86_64_PC64",
    41: "R_X86_64_GOTPCRELX",
    42: "R_X86_64_REX_GOTPCRELX",
}
_PC32 = frozenset({2, 4})
_PC64 = 24
_GOT = frozenset({9, 41, 42})
_DATA_HELP = (
    "a C patchlet can use its argument, locals, constants and its own functions, but "
    "no global or static variables (the trampoline is read-only), thread-locals, or "
    "library functions"
)
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_JUMP_INDEX = re.compile(r"\bMP_JUMP\s*\(\s*(0[xX][0-9a-fA-F]+|[0-9]+)[uUlL]*\s*\)")


class CCompileError(AssemblyError):
    """A C patchlet does not compile, or its object cannot be used as a patchlet body."""


@dataclass(frozen=True)
class CompiledC:
    """The linked code of a C patchlet: position independent; `entry` is the
    offset of `patchlet` in `text`."""

    text: bytes
    entry: int


def compiler() -> list[str]:
    """The C compiler command: $CC if set, else `cc`."""
    return shlex.split(os.environ.get("CC") or "cc")


_PROVIDED: dict[str, CompiledC] = {}


def provide_compiled(source: str, compiled: CompiledC) -> None:
    """Use `compiled` for `source` from now on instead of running the compiler.

    For a signed artifact built elsewhere: the host that applies it needs no
    compiler, and runs exactly the bytes that were built and signed.
    """
    _PROVIDED[source] = compiled


def compile_c(source: str) -> CompiledC:
    """Compile and link a C patchlet; CCompileError with the compiler's message,
    or naming the symbol that cannot be used."""
    provided = _PROVIDED.get(source)
    if provided is not None:
        return provided
    return _compile(source, tuple(compiler()))


@functools.lru_cache(maxsize=64)
def _compile(source: str, cc: tuple[str, ...]) -> CompiledC:
    with tempfile.TemporaryDirectory(prefix="micropatch-c-") as tmp:
        Path(tmp, "patchlet.c").write_text(source, encoding="utf-8")
        command = [
            *cc, *CFLAGS, "-I", str(HEADER.parent), "-include", HEADER.name,
            "-c", "patchlet.c", "-o", "patchlet.o",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command,
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT,
                env={**os.environ, "LC_ALL": "C"},  # plain quotes in messages
            )
        except FileNotFoundError:
            raise CCompileError(
                f"no C compiler: {cc[0]!r} was not found; install gcc or clang, or set $CC"
            ) from None
        except subprocess.TimeoutExpired:
            raise CCompileError(
                f"the C compiler ({cc[0]}) took more than {COMPILE_TIMEOUT:.0f} s"
            ) from None
        if done.returncode != 0:
            raise CCompileError(f"does not compile ({cc[0]}):{_compiler_message(done.stderr)}")
        return link(Path(tmp, "patchlet.o").read_bytes())


def _compiler_message(stderr: str) -> str:
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    # The header is forced in first; its path means nothing to the author.
    lines = [line.replace(str(HEADER), HEADER.name) for line in lines]
    if len(lines) > _SHOWN_LINES:
        lines = [*lines[:_SHOWN_LINES], f"... ({len(lines) - _SHOWN_LINES} more lines)"]
    return "".join(f"\n    {line}" for line in lines) or " (no message)"


def link(obj: bytes) -> CompiledC:
    """Lay out the code sections of a relocatable object in one blob and apply
    its PC-relative relocations; refuse anything else, naming the symbol."""
    try:
        elf = ELFFile(io.BytesIO(obj))
        return _link(elf)
    except ELFError as exc:
        raise CCompileError(f"the compiler's output is not a usable ELF object: {exc}") from None


def _link(elf: ELFFile) -> CompiledC:
    if elf.get_machine_arch() != "x64" or elf["e_type"] != "ET_REL":
        raise CCompileError("the compiler did not produce an x86-64 relocatable object")
    sections = list(elf.iter_sections())
    symtab = next((s for s in sections if isinstance(s, SymbolTableSection)), None)
    if symtab is None:
        raise CCompileError(f"the object has no symbol table, so no function {ENTRY!r}")
    symbols = list(symtab.iter_symbols())

    placed: dict[int, int] = {}  # section index -> offset in the blob
    blob = bytearray()
    # Code, then read-only data (constants, string literals): the cave is
    # readable, so both can live in the trampoline. Writable data cannot.
    for wanted in (_is_code, _is_constant):
        for index, section in enumerate(sections):
            if wanted(section):
                align = max(1, section["sh_addralign"])
                blob += b"\xcc" * (-len(blob) % align)
                placed[index] = len(blob)
                blob += section.data()
    for index, section in enumerate(sections):
        if index not in placed and _is_data(section):
            raise CCompileError(_data_problem(section, index, symbols))

    for section in sections:
        if not isinstance(section, RelocationSection) or section["sh_info"] not in placed:
            continue
        base = placed[section["sh_info"]]
        for relocation in section.iter_relocations():
            symbol = symbols[relocation["r_info_sym"]]
            kind = relocation["r_info_type"]
            where = base + relocation["r_offset"]
            name = _describe(symbol, sections)
            if symbol["st_shndx"] == "SHN_UNDEF":
                raise CCompileError(
                    f"uses {name}, which the patchlet does not define; {_DATA_HELP}"
                )
            target_section = symbol["st_shndx"]
            if not isinstance(target_section, int) or target_section not in placed:
                section_name = (
                    sections[target_section].name
                    if isinstance(target_section, int)
                    else str(target_section)
                )
                raise CCompileError(f"uses {name} in {section_name}; {_DATA_HELP}")
            if kind in _GOT:
                raise CCompileError(
                    f"reaches {name} through the GOT ({_R_X86_64[kind]}); declare it static"
                )
            value = placed[target_section] + symbol["st_value"] + relocation["r_addend"] - where
            if kind in _PC32:
                if not -(1 << 31) <= value < 1 << 31:
                    raise CCompileError(f"reference to {name} out of 32-bit reach")
                blob[where : where + 4] = value.to_bytes(4, "little", signed=True)
            elif kind == _PC64:
                blob[where : where + 8] = value.to_bytes(8, "little", signed=True)
            else:
                kind_name = _R_X86_64.get(kind, f"relocation type {kind}")
                raise CCompileError(
                    f"uses the absolute address of {name} ({kind_name}); only PC-relative "
                    "references inside the patchlet's code can be moved into a process"
                )

    entries = [
        s
        for s in symbols
        if s.name == ENTRY and s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] in placed
    ]
    if not entries:
        raise CCompileError(
            f"no function {ENTRY!r}: define `mp_verdict {ENTRY}(struct mp_regs *r)`"
        )
    entry = placed[entries[0]["st_shndx"]] + entries[0]["st_value"]
    return CompiledC(bytes(blob), entry)


def _is_code(section: Section) -> bool:
    flags = section["sh_flags"]
    return bool(
        flags & SH_FLAGS.SHF_ALLOC
        and flags & SH_FLAGS.SHF_EXECINSTR
        and section["sh_type"] == "SHT_PROGBITS"
        and section["sh_size"]
    )


def _is_constant(section: Section) -> bool:
    flags = section["sh_flags"]
    return bool(
        flags & SH_FLAGS.SHF_ALLOC
        and not flags & (SH_FLAGS.SHF_WRITE | SH_FLAGS.SHF_EXECINSTR | SH_FLAGS.SHF_TLS)
        and section["sh_type"] == "SHT_PROGBITS"
        and section["sh_size"]
        and section.name != ".eh_frame"
    )


def _is_data(section: Section) -> bool:
    """Allocated and non-empty: unless placed (code, constants), what a C
    patchlet cannot bring along (writable or thread-local data)."""
    return bool(
        section["sh_flags"] & SH_FLAGS.SHF_ALLOC
        and section["sh_size"]
        and section["sh_type"] not in ("SHT_NOTE", "SHT_X86_64_UNWIND")
        and section.name != ".eh_frame"
    )


def _data_problem(section: Section, index: int, symbols: list[Symbol]) -> str:
    names = [
        s.name
        for s in symbols
        if s["st_shndx"] == index
        and s.name
        and s["st_info"]["type"] in ("STT_OBJECT", "STT_FUNC", "STT_NOTYPE", "STT_TLS")
    ]
    what = f"`{names[0]}` in {section.name}" if names else f"data in {section.name}"
    return f"defines {what}, which is writable; {_DATA_HELP}"


def _describe(symbol: Symbol, sections: list[Section]) -> str:
    if symbol["st_info"]["type"] == "STT_SECTION":
        index = symbol["st_shndx"]
        name = sections[index].name if isinstance(index, int) else "?"
        return f"data in {name}"
    return f"`{symbol.name}`"


# --- checks on the source text ------------------------------------------------


def _code_only(source: str) -> str:
    return _COMMENT.sub(" ", source)


def uses_return(source: str) -> bool:
    """Whether the C code mentions MP_RETURN (outside comments)."""
    return re.search(r"\bMP_RETURN\b", _code_only(source)) is not None


def uses_blocked(source: str) -> bool:
    """Whether the C code mentions MP_BLOCKED (outside comments)."""
    return re.search(r"\bMP_BLOCKED\b", _code_only(source)) is not None


def jump_indexes(source: str) -> list[int]:
    """The constant indexes of MP_JUMP(n) in the code, to check against `jumps`."""
    return [int(m.group(1), 0) for m in _JUMP_INDEX.finditer(_code_only(source))]


# --- the wrapper -----------------------------------------------------------------


def c_source(
    compiled: CompiledC,
    *,
    jumps: tuple[str, ...],
    at_entry: bool,
    returns: bool,
    blocked: bool = False,
    counter: int | None = None,
) -> str:
    """Assembly that calls the compiled patchlet and acts on its verdict.

    `returns`: the code may answer MP_RETURN (refused unless `at_entry`).
    `blocked`: it may answer MP_BLOCKED(...), which counts at `counter`.
    Like a guard, it relies on the engine stepping over the red zone before it
    except at a function's entry.
    """
    if returns and not at_entry:
        raise CCompileError(f"c: MP_RETURN {AT_ENTRY_ONLY}")
    if blocked and counter is None:
        raise CCompileError(
            "c: MP_BLOCKED needs a blocked-event counter, which this engine does not "
            "provide yet; remove it"
        )
    red_zone = 0 if at_entry else RED_ZONE
    lines = ["pushfq"]
    lines += [f"push {name}" for name in reversed(REGS[8:16])]
    lines.append("lea rsp, [rsp - 0x8]")  # the rsp slot, filled below
    lines += [f"push {name}" for name in reversed(REGS[:7])]
    lines += [
        f"lea rax, [rsp + {_FRAME + red_zone:#x}]",  # rsp at the patched location
        f"mov qword ptr [rsp + {_SLOT['rsp']:#x}], rax",
        f"mov r12, qword ptr [rsp + {_SLOT['rflags']:#x}]",  # r12, rbx: callee-saved
        "mov rbx, rsp",
        "mov rdi, rsp",
        "and rsp, -0x10",  # the System V ABI wants rsp % 16 == 0 at a call
        "call mp_c_entry",
        "mov rsp, rbx",
        # Take back only the arithmetic flags from r->rflags.
        f"mov rcx, qword ptr [rsp + {_SLOT['rflags']:#x}]",
        f"and rcx, {ARITHMETIC_FLAGS:#x}",
        f"and r12, {~ARITHMETIC_FLAGS:#x}",
        "or rcx, r12",
        f"mov qword ptr [rsp + {_SLOT['rflags']:#x}], rcx",
    ]
    if counter is not None:
        lines += [
            "test eax, 0x100",
            "jz mp_c_counted",
            f"mov rcx, {counter:#x}",
            "lock inc qword ptr [rcx]",
            "mp_c_counted:",
        ]
    lines.append("movzx eax, al")
    if returns:
        lines += [f"cmp rax, {KIND_RETURN}", "je mp_c_return"]
    if jumps:
        lines += [f"cmp rax, {KIND_JUMP}", "jne mp_c_continue"]
        for index in range(len(jumps)):
            lines += [f"cmp rdx, {index:#x}", f"je mp_c_jump_{index}"]
    # Any other verdict, or an index outside `jumps`, continues.
    lines.append("jmp mp_c_continue")
    for index, location in enumerate(jumps):
        lines.append(f"mp_c_jump_{index}:")
        lines += _restore()
        if red_zone:
            lines.append(f"lea rsp, [rsp + {red_zone:#x}]")
        lines.append(f"jmp {{{location}}}")
    if returns:
        lines += ["mp_c_return:", f"mov qword ptr [rsp + {_SLOT['rax']:#x}], rdx"]
        lines += _restore()
        lines.append("ret")
    lines += _blob(compiled)
    lines.append("mp_c_continue:")
    lines += _restore()
    return "\n".join(lines) + "\n"


def _restore() -> list[str]:
    lines = [f"pop {name}" for name in REGS[:7]]
    lines.append("lea rsp, [rsp + 0x8]")  # rsp is read only
    lines += [f"pop {name}" for name in REGS[8:16]]
    lines.append("popfq")
    return lines


def _blob(compiled: CompiledC) -> list[str]:
    lines = []
    text = compiled.text
    for label, start, end in (
        (None, 0, compiled.entry),
        ("mp_c_entry:", compiled.entry, len(text)),
    ):
        if label:
            lines.append(label)
        for at in range(start, end, 16):
            chunk = text[at : min(at + 16, end)]
            lines.append(".byte " + ", ".join(f"{b:#04x}" for b in chunk))
    return lines
