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

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from micropatch.errors import AssemblyError

HEADER = Path(__file__).with_name("micropatch.h")
ENTRY = "patchlet"


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


class CCompileError(AssemblyError):
    """A C patchlet does not compile, or its object cannot be used as a patchlet body."""


@dataclass(frozen=True)
class CompiledC:
    """The linked code of a C patchlet: position independent; `entry` is the
    offset of `patchlet` in `text`."""

    text: bytes
    entry: int


def default_compiler() -> tuple[str, ...]:
    """The C compiler command: $CC if set, else `cc`."""
    return tuple(shlex.split(os.environ.get("CC") or "cc"))


def compile_c(source: str, cc: tuple[str, ...]) -> CompiledC:
    """Compile and link a C patchlet with the compiler command `cc`; CCompileError
    with the compiler's message, or naming the symbol that cannot be used.

    No cache here: `bodies.Toolchain` owns one per toolchain."""
    import subprocess
    import tempfile

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
        from micropatch.bodies.clink import link

        return link(Path(tmp, "patchlet.o").read_bytes())


def _compiler_message(stderr: str) -> str:
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    # The header is forced in first; its path means nothing to the author.
    lines = [line.replace(str(HEADER), HEADER.name) for line in lines]
    if len(lines) > _SHOWN_LINES:
        lines = [*lines[:_SHOWN_LINES], f"... ({len(lines) - _SHOWN_LINES} more lines)"]
    return "".join(f"\n    {line}" for line in lines) or " (no message)"
