"""C bodies: compiling, linking, the wrapper's ABI (run in unicorn), and errors."""

from __future__ import annotations

import re

import pytest

from micropatch.arch.x86_64.constants import RED_ZONE
from micropatch.arch.x86_64.trampoline import writes_stack
from micropatch.bodies.assemble import assemble
from micropatch.bodies.cbody import HEADER, CCompileError, CompiledC
from micropatch.bodies.cwrapper import ARITHMETIC_FLAGS, REGS, c_source
from micropatch.bodies.frame import StackContext
from micropatch.bodies.toolchain import Toolchain
from micropatch.patch.ctext import jump_indexes, uses_blocked, uses_return

from ..arch.emulator import PAGE, REGISTERS, run

compile_c = Toolchain().compile_c
CODE = 0x100000
TARGETS = (0x200000, 0x210000)
RETURN_ADDRESS = 0x300000
DATA = 0x400000
STACK = 0x500000  # 4 pages; rsp at the site is 0x502008 (8 mod 16, as at a call)
SITE_RSP = STACK + 2 * PAGE + 8
COUNTER = DATA + 0x40
_GPRS = [name for name in REGISTERS if name not in ("rsp", "rflags")]

# Records what it saw in registers it then changes, and answers by r->rdi:
# 0 continue, 1 return r->rsi, 2 jump to jumps[r->rsi], 3 blocked + continue.
PROBE = r"""
static mp_u64 twice(mp_u64 x) { return 2 * x; }   /* a call inside the patchlet */

mp_verdict patchlet(struct mp_regs *r)
{
    mp_u64 sp;
    __asm__ volatile("mov %%rsp, %0" : "=r"(sp));
    r->r15 = sp;                  /* the stack pointer the C code runs on */
    r->r14 = r->rsp;              /* the site's rsp, as the wrapper reports it */
    r->r13 = twice(r->r13);
    r->r12 = (mp_u64)r;
    r->rflags ^= 0x1 | 0x100;     /* flip CF (taken back) and TF (ignored) */
    switch (r->rdi) {
    case 1: return MP_RETURN(r->rsi);
    case 2: return MP_JUMP(r->rsi);
    case 3: return MP_BLOCKED(MP_CONTINUE);
    default: return MP_CONTINUE;
    }
}
"""


def _stack() -> bytes:
    """Four pages of a pattern, with the return address at the site's rsp."""
    stack = bytearray(i * 7 % 251 for i in range(4 * PAGE))
    at = SITE_RSP - STACK
    stack[at : at + 8] = RETURN_ADDRESS.to_bytes(8, "little")
    return bytes(stack)


def _machine(**changes: int) -> dict[str, int]:
    registers = {name: 0x1111 * (i + 1) for i, name in enumerate(_GPRS)}
    registers.update(rsp=SITE_RSP, rflags=0x2 | 0x40 | 0x80, **changes)
    return registers


def _run(source: str, registers: dict[str, int], *, at_entry: bool, jumps=("t0", "t1")):
    # As the engine places it: the red zone is stepped over except at an entry.
    head = b"" if at_entry else bytes.fromhex("488da42480ffffff")
    tail = b"" if at_entry else bytes.fromhex("488da42480000000")
    where = StackContext(step=0 if at_entry else RED_ZONE, return_slot=0 if at_entry else None)
    resolve = {"t0": TARGETS[0], "t1": TARGETS[1]}.__getitem__
    body = assemble(source, CODE + len(head), resolve, where)
    code = head + body + tail
    memory = {
        CODE: code + b"\x90" * 16,
        TARGETS[0]: b"\x90" * 16,
        TARGETS[1]: b"\x90" * 16,
        RETURN_ADDRESS: b"\x90" * 16,
        DATA: bytes(PAGE),
        STACK: _stack(),
    }
    outcome = run(memory, CODE, CODE + len(code), registers, [(DATA, PAGE), (STACK, 4 * PAGE)])
    return outcome, code


def _probe_source(*, at_entry: bool, counter: int | None = COUNTER) -> str:
    return c_source(
        compile_c(PROBE),
        jumps=("t0", "t1"),
        at_entry=at_entry,
        returns=at_entry,
        blocked=True,
        counter=counter,
    )


@pytest.mark.parametrize("at_entry", [True, False])
def test_continue_takes_registers_back(at_entry: bool) -> None:
    before = _machine(rdi=0)
    outcome, code = _run(_probe_source(at_entry=at_entry), before, at_entry=at_entry)
    after = outcome.registers
    assert outcome.exit == CODE + len(code)
    assert after["rsp"] == SITE_RSP
    assert after["r15"] % 16 == 8, "rsp % 16 == 8 at the C function's entry, as after a call"
    assert after["r14"] == SITE_RSP, "r->rsp is the rsp at the patched location"
    assert after["r13"] == 2 * before["r13"]
    assert after["r12"] < SITE_RSP - (0 if at_entry else 128) and after["r12"] % 8 == 0
    assert after["rflags"] == before["rflags"] ^ 0x1, "CF taken back, TF not"
    for name in _GPRS:
        if name not in ("r12", "r13", "r14", "r15"):
            assert after[name] == before[name], name
    # Nothing at or above the site's rsp changed, nor the red zone below it.
    spared = 2 * PAGE + 8 - (0 if at_entry else 128)
    assert outcome.memory[STACK][spared:] == _stack()[spared:]


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("at_entry", [True, False])
def test_jump(at_entry: bool, index: int) -> None:
    before = _machine(rdi=2, rsi=index)
    outcome, _ = _run(_probe_source(at_entry=at_entry), before, at_entry=at_entry)
    assert outcome.exit == TARGETS[index]
    assert outcome.registers["rsp"] == SITE_RSP
    assert outcome.registers["r13"] == 2 * before["r13"]
    assert outcome.registers["rsi"] == index


def test_jump_index_out_of_range_continues() -> None:
    outcome, code = _run(_probe_source(at_entry=False), _machine(rdi=2, rsi=7), at_entry=False)
    assert outcome.exit == CODE + len(code)


def test_return_at_entry() -> None:
    before = _machine(rdi=1, rsi=2**64 - 1)
    outcome, _ = _run(_probe_source(at_entry=True), before, at_entry=True)
    assert outcome.exit == RETURN_ADDRESS
    assert outcome.registers["rsp"] == SITE_RSP + 8
    assert outcome.registers["rax"] == 2**64 - 1
    assert outcome.registers["rbx"] == before["rbx"]


def test_blocked_counts() -> None:
    outcome, code = _run(_probe_source(at_entry=False), _machine(rdi=3), at_entry=False)
    assert outcome.exit == CODE + len(code)
    assert outcome.memory[DATA][0x40:0x48] == (1).to_bytes(8, "little")
    outcome, _ = _run(_probe_source(at_entry=False), _machine(rdi=0), at_entry=False)
    assert outcome.memory[DATA][0x40:0x48] == bytes(8)


def test_constants_and_strings_are_carried_along() -> None:
    source = r"""
    static const mp_u64 table[8] = {3, 1, 4, 1, 5, 9, 2, 6};
    mp_verdict patchlet(struct mp_regs *r)
    {
        const char *s = "micropatch";
        r->rax = table[r->rdi & 7] + (mp_u64)s[r->rsi % 10];
        return MP_CONTINUE;
    }
    """
    wrapper = c_source(compile_c(source), jumps=(), at_entry=True, returns=False)
    outcome, _ = _run(wrapper, _machine(rdi=5, rsi=2), at_entry=True, jumps=())
    assert outcome.registers["rax"] == 9 + ord("c")


def test_wrapper_writes_the_stack() -> None:
    """The engine then steps over the red zone, which the wrapper counts on."""
    code = assemble(
        _probe_source(at_entry=False), CODE, {"t0": TARGETS[0], "t1": TARGETS[1]}.__getitem__
    )
    assert writes_stack(code, CODE)


def test_header_matches_the_wrapper() -> None:
    text = HEADER.read_text()
    body = re.search(r"struct mp_regs \{(.*?)\};", text, re.S)
    assert body is not None
    fields = re.findall(r"\b(r\w+)\b", re.sub(r"mp_u64", "", body.group(1)))
    assert tuple(fields) == REGS
    assert ARITHMETIC_FLAGS == 0x8D5


def test_source_scans() -> None:
    source = "/* MP_RETURN(1) MP_BLOCKED */ // MP_JUMP(9)\nreturn MP_JUMP(0x1) ? MP_JUMP( 2 ) : MP_JUMP(i);"
    assert not uses_return(source) and not uses_blocked(source)
    assert jump_indexes(source) == [1, 2]
    assert uses_return("return MP_RETURN(-1);") and uses_blocked("MP_BLOCKED(MP_CONTINUE)")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "mp_verdict patchlet(struct mp_regs *r)\n{\n    return MP_CONTINUE\n}\n",
            r"does not compile \(cc\):\n    patchlet\.c: In function 'patchlet':\n    patchlet\.c:[34]:[0-9]+: error: expected ';'",
        ),
        (
            "int patchlet(struct mp_regs *r) { return 0; }",
            r"error: conflicting types for 'patchlet'",
        ),
        (
            "mp_verdict patchlet(struct mp_regs *r) { r->rax = (mp_u64)(r->rbx * 1.5); return MP_CONTINUE; }",
            r"does not compile \(cc\):.*error: .*SSE",
        ),
        (
            "mp_verdict patchlet(struct mp_regs *r) { if (r->rax) return MP_CONTINUE; }",
            r"error: control reaches end of non-void function",
        ),
        (
            "mp_verdict patchlt(struct mp_regs *r) { (void)r; return MP_CONTINUE; }",
            r"^no function 'patchlet': define `mp_verdict patchlet\(struct mp_regs \*r\)`$",
        ),
        (
            "static int n;\nmp_verdict patchlet(struct mp_regs *r) { r->rax = ++n; return MP_CONTINUE; }",
            r"^defines `n` in \.bss, which is writable; a C patchlet can use",
        ),
        (
            "int n = 4;\nmp_verdict patchlet(struct mp_regs *r) { r->rax = n; return MP_CONTINUE; }",
            r"^defines `n` in \.data, which is writable",
        ),
        (
            "extern int limit;\nmp_verdict patchlet(struct mp_regs *r) { r->rax = limit; return MP_CONTINUE; }",
            r"^uses `limit`, which the patchlet does not define; .*no global or static variables",
        ),
        (
            "void abort(void);\nmp_verdict patchlet(struct mp_regs *r) { if (r->rax) abort(); return MP_CONTINUE; }",
            r"^uses `abort`, which the patchlet does not define; .*or library functions",
        ),
        (
            "mp_verdict patchlet(struct mp_regs *r) { undeclared(r); return MP_CONTINUE; }",
            r"error: implicit declaration of function 'undeclared'",
        ),
    ],
    ids=[
        "syntax",
        "signature",
        "float",
        "no-return",
        "no-entry",
        "bss",
        "data",
        "extern",
        "libc",
        "implicit",
    ],
)
def test_compile_errors(source: str, message: str) -> None:
    with pytest.raises(CCompileError) as err:
        compile_c(source)
    assert re.search(message, str(err.value), re.S), str(err.value)


def test_no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(
        CCompileError,
        match=r"no C compiler: '/nonexistent/cc' was not found; install gcc or clang, or set \$CC",
    ):
        Toolchain().compile_c(
            "mp_verdict patchlet(struct mp_regs *r) { (void)r; return MP_CONTINUE; }"
        )


def test_return_refused_mid_function() -> None:
    with pytest.raises(
        CCompileError, match=r"^c: MP_RETURN is only possible at a function's entry"
    ):
        c_source(compile_c(PROBE), jumps=(), at_entry=False, returns=True)


def test_blocked_needs_a_counter() -> None:
    with pytest.raises(CCompileError, match=r"^c: MP_BLOCKED needs a blocked-event counter"):
        _probe_source(at_entry=True, counter=None)


def test_provided_code_needs_no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """An artifact built elsewhere brings its compiled code along."""
    source = "mp_verdict patchlet(struct mp_regs *r) { r->rax = 7; return MP_CONTINUE; }"
    built = compile_c(source)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    signed = Toolchain.signed({source: built})
    assert signed.compile_c(source) == built
    other = "mp_verdict patchlet(struct mp_regs *r) { r->rax = 8; return MP_CONTINUE; }"
    with pytest.raises(CCompileError, match="runs only signed code"):
        signed.compile_c(other)


def test_toolchains_do_not_share_state() -> None:
    """Code one toolchain was given (from an unverified artifact, say) never reaches another."""
    source = "mp_verdict patchlet(struct mp_regs *r) { r->rax = 9; return MP_CONTINUE; }"
    fake = Toolchain.signed({source: CompiledC(b"\xcc", 0)})
    assert fake.compile_c(source).text == b"\xcc"
    assert Toolchain().compile_c(source).text != b"\xcc"
