"""The three body kinds (assembly, guard, C) on real processes.

copy_packet(buf, len) answers -2 for len > 64 ("would have overflowed"), -1
for len < 0, else len. The fix rejects len > 64 with -1; written three ways it
must behave identically. See tests/targets/vuln.c and redzone.c for offsets.
"""

from __future__ import annotations

import pytest

from micropatch import live
from micropatch.errors import PatchFormatError
from micropatch.process.maps import read_maps

from .patching import assert_untouched, make_patch

FIX_AT_ENTRY = {
    "asm": {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov eax, -1\nret\nok:"},
    "guard": {"at": "copy_packet", "when": "esi > 64", "then": "return -1"},
    "c": {
        "at": "copy_packet",
        "c": "mp_verdict patchlet(struct mp_regs *r)\n"
        "{\n"
        "    if ((int)r->rsi > 64)\n"
        "        return MP_RETURN(-1);\n"
        "    return MP_CONTINUE;\n"
        "}\n",
    },
}
CASES = {65: "-1", 1000: "-1", 64: "64", 10: "10", 0: "0", -3: "-1"}
UNPATCHED = {65: "-2", 1000: "-2", 64: "64", 10: "10", 0: "0", -3: "-1"}


def _answers(t, cases=CASES):
    return {n: t.cmd(f"call {n}") for n in cases}


@pytest.mark.parametrize("kind", sorted(FIX_AT_ENTRY))
@pytest.mark.parametrize("name", ["vuln_pie", "vuln_nopie", "vuln_lib_main"])
def test_same_fix_three_ways(targets, start, name, kind):
    module = targets.libvuln if name == "vuln_lib_main" else targets.path(name)
    t = start(name)
    assert _answers(t) == UNPATCHED
    patch = make_patch(module, [FIX_AT_ENTRY[kind]])
    live.apply(patch, t.pid)
    assert _answers(t) == CASES
    live.remove(patch.id, t.pid)
    assert _answers(t) == UNPATCHED
    assert_untouched(targets, name, t.pid, ["copy_packet"], module)


@pytest.mark.parametrize(("name", "error_path"), [("vuln_pie", "0xb6"), ("vuln_nopie", "0xae")])
def test_guard_jumps_to_error_path_mid_function(targets, start, name, error_path):
    """At the bound check (+0x8), the guard jumps to the existing `return -1`."""
    t = start(name)
    patch = make_patch(
        targets.path(name),
        [{"at": "copy_packet+0x8", "when": "esi > 64", "then": f"jump copy_packet+{error_path}"}],
    )
    live.apply(patch, t.pid)
    assert _answers(t) == CASES
    live.remove(patch.id, t.pid)
    assert _answers(t) == UNPATCHED


def test_c_jumps_to_error_path_mid_function(targets, start):
    t = start("vuln_pie")
    source = """
    mp_verdict patchlet(struct mp_regs *r)
    {
        return (mp_i32)r->rsi > 64 ? MP_JUMP(0) : MP_CONTINUE;
    }
    """
    patch = make_patch(
        targets.vuln_pie, [{"at": "copy_packet+0x8", "c": source, "jumps": ["copy_packet+0xb6"]}]
    )
    live.apply(patch, t.pid)
    assert _answers(t) == CASES
    live.remove(patch.id, t.pid)
    assert _answers(t) == UNPATCHED


def test_c_changes_a_register_then_continues(targets, start):
    """At the entry, len > 64 becomes -1: the displaced `test esi,esi; js` then
    take the error path. Checks that r->rsi is written back and that the flags
    the displaced instructions compute are not disturbed."""
    t = start("vuln_pie")
    source = """
    mp_verdict patchlet(struct mp_regs *r)
    {
        if ((mp_i32)r->rsi > 64)
            r->rsi = (mp_u64)-1;
        return MP_CONTINUE;
    }
    """
    patch = make_patch(targets.vuln_pie, [{"at": "copy_packet", "c": source}])
    live.apply(patch, t.pid)
    assert _answers(t) == CASES


def test_guard_keeps_flags_for_displaced_jcc(targets, start):
    """A guard at +0x2 (the `js` right after `test esi,esi`) must preserve the
    flags the displaced conditional jump reads."""
    t = start("vuln_pie")
    patch = make_patch(
        targets.vuln_pie,
        # Mid-function, so `then` cannot return; the condition is never true.
        [
            {
                "at": "copy_packet+0x2",
                "when": "rdi == 0 && esi == 12345",
                "then": "jump copy_packet+0xb6",
            }
        ],
    )
    live.apply(patch, t.pid)
    assert _answers(t) == UNPATCHED


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # a[0] = n sits at [rsp-0x78] at +0x7a; rax = n + 12 there; +0xe7 is `ret`.
        ({"when": "i64[rsp-0x78] == 777", "then": "jump rz_sum+0xe7"}, {777: 789}),
        (
            {
                "c": "mp_verdict patchlet(struct mp_regs *r)\n{\n"
                "    volatile mp_u64 pad[32];\n"  # the C code's stack, below the red zone
                "    for (int i = 0; i < 32; i++) pad[i] = 0xdead;\n"
                "    return ((mp_i64 *)r->rsp)[-15] == 777 ? MP_JUMP(0) : MP_CONTINUE;\n}\n",
                "jumps": ["rz_sum+0xe7"],
            },
            {777: 789},
        ),
    ],
    ids=["guard", "c"],
)
def test_red_zone_is_spared_and_rsp_is_the_sites(targets, start, body, expected):
    """Mid-function in a leaf whose 14 locals live in the red zone: the body
    reads a local through rsp and must not clobber any of them."""
    t = start("redzone")
    patch = make_patch(targets.redzone, [{"at": "rz_sum+0x7a", **body}])
    live.apply(patch, t.pid)
    for n in (0, 5, 1000, 776, 778):
        assert t.cmd(f"call {n}") == str(14 * n + 91)
    for n, answer in expected.items():
        assert t.cmd(f"call {n}") == str(answer)
    live.remove(patch.id, t.pid)
    assert t.cmd("call 777") == str(14 * 777 + 91)


@pytest.mark.parametrize(
    "body",
    [
        {"when": "esi > 64", "then": "return -1"},
        {"c": "mp_verdict patchlet(struct mp_regs *r) { (void)r; return MP_RETURN(-1); }"},
    ],
    ids=["guard", "c"],
)
def test_return_mid_function_is_refused_untouched(targets, start, body):
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [{"at": "copy_packet+0x8", **body}])
    with pytest.raises(PatchFormatError) as err:
        live.apply(patch, t.pid)
    message = str(err.value)
    assert "patchlet[0] (copy_packet+0x8)" in message
    assert "only possible at a function's entry" in message
    assert _answers(t) == UNPATCHED
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


@pytest.mark.parametrize(
    "body",
    [
        {"when": "esi > 64", "then": "blocked; return -1"},
        {
            "code": "cmp esi, 64\njle ok\nlock inc qword ptr [rip + {@blocked}]\nmov eax, -1\nret\nok:"
        },
        {
            "c": "#include <micropatch.h>\nmp_verdict patchlet(struct mp_regs *r) {\n"
            "  if ((int)r->rsi > 64) return MP_BLOCKED(MP_RETURN(-1));\n  return MP_CONTINUE;\n}"
        },
    ],
    ids=["guard", "asm", "c"],
)
def test_blocked_events_are_counted(targets, start, body):
    """Each blocked attempt increments the patchlet's counter in the cave's writable page
    (the registry's, never executable)."""
    t = start("vuln_pie")
    patch = make_patch(targets.vuln_pie, [{"at": "copy_packet", **body}])
    outcome = live.apply(patch, t.pid)
    [state] = live.status(t.pid)
    assert state.blocked == 0
    # The counters the registry records, in the outcome: the agent keeps them from it.
    assert outcome.counters == state.counters != ()
    assert [t.cmd("call 65"), t.cmd("call 100"), t.cmd("call 10")] == ["-1", "-1", "10"]
    [state] = live.status(t.pid)
    assert state.blocked == 2
    pages = [m for m in read_maps(t.pid) if "micropatch" in m.path]
    assert sorted(m.perms for m in pages) == ["r-xp", "rw-p"], "W^X: code and counters apart"
    live.remove(patch.id, t.pid)
    assert t.cmd("call 65") == "-2"
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
