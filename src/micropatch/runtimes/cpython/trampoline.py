"""The x86-64 code in a patched interpreter's page: two ways in, one runner.

`pending` is a pending call (`int f(void *)`): the interpreter calls it
between two bytecodes, holding the GIL, when it handles its eval breaker.
`hijack` is where a thread parked in a blocking system call is sent (its
registers saved in a frame on its own stack, below the red zone): it takes
the GIL with `PyGILState_Ensure` while every other thread runs, runs the
runner, releases the GIL, restores errno and every register from the frame
and returns to where it was, with its system call returning EINTR (which
CPython, the only caller we send here, retries: PEP 475).

Both call `run`, which
1. claims the operation: `lock cmpxchg` of the state word ARMED -> PREPARING
   (else it returns: another thread ran it, or the patcher cancelled it);
2. runs the runner's source with `PyRun_StringFlags` in a fresh globals dict
   holding `__builtins__` and `page`, a memoryview of the page's data;
3. if the runner prepared a commit: PREPARING -> COMMITTING, again with
   `lock cmpxchg` (the patcher may have cancelled meanwhile), then calls the
   commit callable the runner left in the header: C code only (`any` over a
   `map` of `setattr`s), so no bytecode runs and the GIL is not released
   between the swaps; COMMITTED after. If the commit raises (an audit hook),
   the rollback callable restores every function: FAILED.
Whatever happens, the state word ends in a terminal state and the runner's
globals are released. Only on the pending-call path does an exception that
escaped the runner (a signal handler's, e.g. KeyboardInterrupt) propagate:
the interpreter raises it where it was, as it would have without us.
"""

from __future__ import annotations

from collections.abc import Mapping

from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError

from micropatch.errors import InterpreterError
from micropatch.runtimes.cpython import page as P

# The C functions the code calls: the interpreter's, and errno's from the C library.
FUNCTIONS = (
    "PyGILState_Ensure", "PyGILState_Release", "PyDict_New", "PyDict_SetItemString",
    "PyImport_AddModule", "PyModule_GetDict", "PyMemoryView_FromMemory",
    "PyRun_StringFlags", "PyErr_Clear", "PyObject_CallObject", "Py_DecRef",
)  # fmt: skip
LIBC_FUNCTIONS = ("__errno_location",)
STRINGS = (b"builtins\0", b"__builtins__\0", b"page\0")
PY_FILE_INPUT = 257
PYBUF_WRITE = 0x200
PENDING_ENTRY = 0  # offset of `pending` in the page: the pending call's function
_POPS = "pop r15; pop r14; pop r13; pop r12; pop rbp; pop rbx; pop r11; pop r10; pop r9; " \
        "pop r8; pop rax; pop rcx; pop rdx; pop rsi; pop rdi; popfq; ret 128"  # fmt: skip


def _source(f: Mapping[str, int], page: int, strings: list[int]) -> str:
    state = page + P.HEADER + P.H_STATE

    def call(name: str) -> str:
        return f"movabs rax, {f[name]:#x}; call rax"

    def field(offset: int) -> str:
        return f"[rbx + {offset - P.H_STATE}]"

    return f"""
    pending:
        push rbx
        mov edi, {P.ENTRY_PENDING}
        call run
        pop rbx
        ret
    hijack:
        mov rbx, rsp
        and rsp, -16
        {call("__errno_location")}
        mov r12, rax
        mov r13d, dword ptr [rax]
        {call("PyGILState_Ensure")}
        mov r14d, eax
        mov edi, {P.ENTRY_HIJACK}
        call run
        mov edi, r14d
        {call("PyGILState_Release")}
        mov dword ptr [r12], r13d
        mov rsp, rbx
        {_POPS}
    run:
        push rbp; push rbx; push r12; push r13; push r14; push r15
        sub rsp, 8
        mov r15d, edi
        movabs rbx, {state:#x}
        mov eax, {P.ARMED}
        mov ecx, {P.PREPARING}
        lock cmpxchg dword ptr [rbx], ecx
        jne out
        mov dword ptr {field(P.H_KIND)}, r15d
        {call("PyDict_New")}
        test rax, rax
        jz no_globals
        mov r12, rax
        movabs rdi, {strings[0]:#x}
        {call("PyImport_AddModule")}
        test rax, rax
        jz failed_clear
        mov rdi, rax
        {call("PyModule_GetDict")}
        test rax, rax
        jz failed_clear
        mov rdx, rax
        mov rdi, r12
        movabs rsi, {strings[1]:#x}
        {call("PyDict_SetItemString")}
        test eax, eax
        jnz failed_clear
        movabs rdi, {page + P.HEADER:#x}
        movabs rsi, {P.DATA_SIZE:#x}
        mov edx, {PYBUF_WRITE}
        {call("PyMemoryView_FromMemory")}
        test rax, rax
        jz failed_clear
        mov r13, rax
        mov rdi, r12
        movabs rsi, {strings[2]:#x}
        mov rdx, r13
        {call("PyDict_SetItemString")}
        mov r14d, eax
        mov rdi, r13
        {call("Py_DecRef")}
        test r14d, r14d
        jnz failed_clear
        movabs rdi, {page + P.PAYLOAD:#x}
        mov esi, {PY_FILE_INPUT}
        mov rdx, r12
        mov rcx, r12
        xor r8d, r8d
        {call("PyRun_StringFlags")}
        test rax, rax
        jz raised
        mov rdi, rax
        {call("Py_DecRef")}
        cmp dword ptr {field(P.H_PREPARED)}, 1
        jne not_prepared
        mov eax, {P.PREPARING}
        mov ecx, {P.COMMITTING}
        lock cmpxchg dword ptr [rbx], ecx
        jne cancelled
        mov rdi, qword ptr {field(P.H_COMMIT)}
        mov rsi, qword ptr {field(P.H_COMMIT + 8)}
        {call("PyObject_CallObject")}
        test rax, rax
        jz commit_failed
        mov rdi, rax
        {call("Py_DecRef")}
        mov dword ptr [rbx], {P.COMMITTED}
        jmp release
    commit_failed:
        {call("PyErr_Clear")}
        mov rdi, qword ptr {field(P.H_COMMIT + 16)}
        mov rsi, qword ptr {field(P.H_COMMIT + 24)}
        {call("PyObject_CallObject")}
        test rax, rax
        jz rollback_failed
        mov rdi, rax
        {call("Py_DecRef")}
        mov dword ptr [rbx], {P.FAILED}
        jmp release
    rollback_failed:
        {call("PyErr_Clear")}
        mov dword ptr [rbx], {P.BROKEN}
        jmp release
    raised:
        call finish_failed
        cmp r15d, {P.ENTRY_PENDING}
        jne clear_release
        mov rdi, r12
        {call("Py_DecRef")}
        mov eax, -1
        jmp epilogue
    clear_release:
        {call("PyErr_Clear")}
        jmp release
    failed_clear:
        {call("PyErr_Clear")}
    not_prepared:
        call finish_failed
        jmp release
    cancelled:
        mov eax, {P.CANCELLING}
        mov ecx, {P.CANCELLED}
        lock cmpxchg dword ptr [rbx], ecx
    release:
        mov rdi, r12
        {call("Py_DecRef")}
    out:
        xor eax, eax
    epilogue:
        add rsp, 8
        pop r15; pop r14; pop r13; pop r12; pop rbx; pop rbp
        ret
    no_globals:
        {call("PyErr_Clear")}
        call finish_failed
        jmp out
    finish_failed:
        mov eax, {P.PREPARING}
        mov ecx, {P.FAILED}
        lock cmpxchg dword ptr [rbx], ecx
        je finished
        mov eax, {P.CANCELLING}
        mov ecx, {P.CANCELLED}
        lock cmpxchg dword ptr [rbx], ecx
    finished:
        ret
    """


def assemble(functions: Mapping[str, int], page: int) -> tuple[bytes, int]:
    """The code page's content for a page at `page`, and the offset of `hijack`."""
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    try:
        # Every address is a 10-byte movabs, so the code's length does not depend on
        # them: assemble once to place the strings after the code, then for real.
        placeholder = [page] * len(STRINGS)
        first, _ = ks.asm(_source(functions, page, placeholder), page)
        at = page + len(first)
        strings = []
        for text in STRINGS:
            strings.append(at)
            at += len(text)
        code, _ = ks.asm(_source(functions, page, strings), page)
        prefix = _source(functions, page, strings).split("hijack:")[0]
        hijack, _ = ks.asm(prefix + "\nrun:\n", page)  # `pending`'s call needs its label
    except KsError as exc:
        raise InterpreterError(f"cannot assemble the interpreter trampoline: {exc}") from None
    blob = bytes(code) + b"".join(STRINGS)
    if len(code) != len(first) or len(blob) > P.HEADER:
        raise InterpreterError("the interpreter trampoline does not fit its page")
    return blob, len(hijack)
