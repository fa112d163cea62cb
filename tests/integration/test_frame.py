"""`[frame+N]`, the function's `[rsp+N]` at the site, in bodies that push and
call, and the stack rules a body is held to, on a real process.

fr_scale(n) keeps 2n at [rsp+0x8] and 1000 at [rsp+0x10] and answers
fr_helper([rsp+0x8]) + [rsp+0x10] = 2n + 1001; its return address is at
[rsp+0x28] at the site (CFA rsp+0x30). See tests/targets/frame.c.
"""

from __future__ import annotations

import pytest

from micropatch import live
from micropatch.errors import StackError

from .patching import assert_untouched, make_patch

SITE = "fr_scale+0x1a"
# Saves what it uses, reads the function's slot, calls a function that clobbers
# every caller-saved register, writes two of the function's slots back. It pushes
# and calls, so it runs 128 bytes below the function's rsp, 16 more by the time
# it reads [frame+0x8]: any other offset reads or writes the wrong slot.
ASM = """\
push rax
push rdi
push rcx
push rdx
push rsi
push r8
push r9
push r10
push r11
sub rsp, 8
mov rdi, qword ptr [frame+0x8]
call {fr_clamp}
mov qword ptr [frame+0x8], rax
lea rax, [frame+0x10]
mov qword ptr [rax], 7
add rsp, 8
pop r11
pop r10
pop r9
pop r8
pop rsi
pop rdx
pop rcx
pop rdi
pop rax
"""
# The same in C: r->rsp is the site's rsp.
C = """\
mp_verdict patchlet(struct mp_regs *r)
{
    mp_i64 *frame = (mp_i64 *)r->rsp;
    frame[1] = frame[1] > 100 ? 100 : frame[1];
    frame[2] = 7;
    return MP_CONTINUE;
}
"""


def _unpatched(n: int) -> str:
    return str(2 * n + 1001)


def _patched(n: int) -> str:
    return str(min(2 * n, 100) + 8)


@pytest.mark.parametrize("body", [{"code": ASM}, {"c": C}], ids=["asm", "c"])
def test_body_reads_and_writes_the_functions_frame(targets, start, body):
    t = start("frame")
    assert [t.cmd(f"call {n}") for n in (3, 50, 70)] == [_unpatched(n) for n in (3, 50, 70)]
    patch = make_patch(targets.frame, [{"at": SITE, **body}])
    live.apply(patch, t.pid)
    for n in (0, 3, 50, 51, 70, 1000):
        assert t.cmd(f"call {n}") == _patched(n), n
    live.remove(patch.id, t.pid)
    assert t.cmd("call 70") == _unpatched(70)
    assert_untouched(targets, "frame", t.pid, ["fr_scale"])


@pytest.mark.parametrize(
    ("code", "message"),
    [
        # The return address is at [rsp+0x28] (CFA rsp+0x30): writing it is refused.
        (
            "push rax\nmov qword ptr [frame+0x28], rax\npop rax",
            r"`mov \[rsp\+0xb0\],rax` \(body\+0x1\) stores 8 bytes at the function's "
            r"\[rsp\+0x28\], at or above its return address at \[rsp\+0x28\] "
            r"\(CFA = rsp\+0x30 at the site, from \.eh_frame\)",
        ),
        # A body that does not push runs at the function's rsp: [rsp+0x24] overlaps it.
        (
            "mov qword ptr [rsp+0x24], rax",
            r"stores 8 bytes at the function's \[rsp\+0x24\], at or above its return "
            r"address at \[rsp\+0x28\] \(CFA = rsp\+0x30",
        ),
        # What the code does, not its text: the store through a copy of rsp.
        (
            "push rcx\nmov rcx, rsp\nmov qword ptr [rcx+0x30], rax\npop rcx",
            r"`mov \[rcx\+0x30\],rax` \(body\+0x4\) addresses the stack at the body's entry "
            r"rsp\+0x28.*outside what the body has pushed.*\[frame\+N\]",
        ),
        (
            "push rax\njne skip\npush rax\nskip:\nmov rax, qword ptr [frame+0x8]\npop rax",
            r"uses \[frame\+N\], but the body's stack depth there is not known: two paths "
            r"reach it with rsp at different depths \(0x",
        ),
        (
            "push rax\nadd rsp, 8\nmov rsp, rax",
            r"rsp is set to a value not known from the entry rsp",
        ),
    ],
    ids=["return-address", "at-rsp", "rsp-copy", "join", "mov-rsp"],
)
def test_stack_misuse_is_refused_untouched(targets, start, code, message):
    t = start("frame")
    patch = make_patch(targets.frame, [{"at": SITE, "code": code}])
    with pytest.raises(StackError, match=message) as err:
        live.apply(patch, t.pid)
    assert f"patchlet[0] ({SITE})" in str(err.value)
    assert "0x7ffff0000000" not in str(err.value)
    assert t.cmd("call 70") == _unpatched(70)
    assert_untouched(targets, "frame", t.pid, ["fr_scale"])
