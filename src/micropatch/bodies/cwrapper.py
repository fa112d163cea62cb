"""The assembly wrapper around a compiled C patchlet: save the registers, call it
on an aligned stack, take the registers back and act on its verdict.

Like a guard, it relies on the engine stepping over the red zone before it
except at a function's entry, and names the site's rsp `[frame]` (`bodies.frame`).
"""

from __future__ import annotations

from micropatch.bodies.cbody import CCompileError, CompiledC
from micropatch.bodies.guard import AT_ENTRY_ONLY

# The order of struct mp_regs in micropatch.h, lowest address first.
REGS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rflags",
)  # fmt: skip
_SLOT = {name: 8 * i for i, name in enumerate(REGS)}
ARITHMETIC_FLAGS = 0x8D5  # CF PF AF ZF SF OF: what the C code may change in rflags
KIND_CONTINUE, KIND_RETURN, KIND_JUMP = 0, 1, 2


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
    lines = ["pushfq"]
    lines += [f"push {name}" for name in reversed(REGS[8:16])]
    lines.append("lea rsp, [rsp - 0x8]")  # the rsp slot, filled below
    lines += [f"push {name}" for name in reversed(REGS[:7])]
    lines += [
        "lea rax, [frame]",  # rsp at the patched location
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
        if not at_entry:
            lines.append("lea rsp, [frame]")  # back above the red zone the engine stepped over
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
