"""Self-test of the C targets: each builds, answers its protocol unpatched,
and still has the instructions and sites its documentation promises."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import iced_x86
import pytest
from elftools.elf.elffile import ELFFile
from targets.harness import (
    ARTIFACTS,
    SITES,
    Site,
    StartTarget,
    Target,
    TargetError,
    Targets,
)

VULN_TARGETS = ("vuln_pie", "vuln_nopie", "vuln_lib_main", "blocker", "forker", "seccomp")
PROGRAMS = [a.name for a in ARTIFACTS if a.name != "libvuln"]


def copy_packet(n: int) -> int:
    """What copy_packet answers unpatched."""
    return -1 if n < 0 else -2 if n > 64 else n


def parse_stats(line: str) -> dict[str, int]:
    words = line.split()
    assert words[0::2][:4] == ["calls", "old", "new", "bad"], line
    stats = {k: int(v) for k, v in zip(words[0:8:2], words[1:8:2], strict=True)}
    assert stats["calls"] == stats["old"] + stats["new"] + stats["bad"], line
    return stats


# --- build ------------------------------------------------------------------


def test_every_artifact_is_built_with_a_build_id(targets: Targets) -> None:
    for artifact in ARTIFACTS:
        path = getattr(targets, artifact.name)
        assert path.is_file() and os.access(path, os.X_OK), path
        with open(path, "rb") as f:
            notes = ELFFile(f).get_section_by_name(".note.gnu.build-id")
            assert notes is not None, f"{path} has no GNU build-id"


def test_pie_and_non_pie(targets: Targets) -> None:
    def elf_type(path: Path) -> str:
        with open(path, "rb") as f:
            return str(ELFFile(f).header["e_type"])

    assert elf_type(targets.vuln_pie) == "ET_DYN"
    assert elf_type(targets.vuln_nopie) == "ET_EXEC"
    assert elf_type(targets.libvuln) == "ET_DYN"
    nopie = targets.symbol("vuln_nopie", "copy_packet")
    assert nopie.vaddr == nopie.offset + 0x400000
    pie = targets.symbol("vuln_pie", "copy_packet")
    assert pie.vaddr == pie.offset


def test_vuln_lib_main_has_copy_packet_only_in_the_library(targets: Targets) -> None:
    with pytest.raises(KeyError):
        targets.symbol("vuln_lib_main", "copy_packet")
    assert targets.symbol("libvuln", "copy_packet").size > 0
    with open(targets.vuln_lib_main, "rb") as f:
        dynamic = ELFFile(f).get_section_by_name(".dynamic")
        tags = list(dynamic.iter_tags())  # type: ignore[union-attr]
    assert "libvuln.so" in [t.needed for t in tags if t.entry.d_tag == "DT_NEEDED"]
    assert [t.runpath for t in tags if t.entry.d_tag == "DT_RUNPATH"] == ["$ORIGIN"]


# --- documented instructions and sites --------------------------------------


def decode_function(targets: Targets, target: str, function: str) -> list[iced_x86.Instruction]:
    sym = targets.symbol(target, function)
    return list(iced_x86.Decoder(64, targets.code(target, function), ip=sym.offset))


def branch_targets(instructions: list[iced_x86.Instruction]) -> set[int]:
    return {
        i.near_branch_target
        for i in instructions
        if i.op0_kind == iced_x86.OpKind.NEAR_BRANCH64
        and i.flow_control != iced_x86.FlowControl.CALL
    }


@pytest.mark.parametrize("site", SITES, ids=lambda s: f"{s.target}:{s.function}+{s.offset:#x}")
def test_documented_site(targets: Targets, site: Site) -> None:
    sym = targets.symbol(site.target, site.function)
    instructions = decode_function(targets, site.target, site.function)
    start = sym.offset + site.offset
    end = start + site.length
    code = targets.code(site.target, site.function)[site.offset : site.offset + site.length]
    expected = bytes.fromhex(site.code)
    assert code.startswith(expected), (
        f"{site.target}:{site.function}+{site.offset:#x} is {code.hex(' ')}, documented as "
        f"{expected.hex(' ')}: the compiler changed the code; update the docs and SITES"
    )
    boundaries = {i.ip for i in instructions} | {instructions[-1].next_ip}
    assert start in boundaries and end in boundaries, "site must be whole instructions"
    assert site.length >= 5
    inside = {t for t in branch_targets(instructions) if start < t < end}
    past_end = end > sym.offset + sym.size
    assert (not inside and not past_end) == site.valid, (inside, past_end)


def test_patched_functions_are_real_functions(targets: Targets) -> None:
    for site in SITES:
        sym = targets.symbol(site.target, site.function)
        assert sym.size > 0, f"{site.function} in {site.target} has no size"


def test_rz_sum_is_a_red_zone_leaf(targets: Targets) -> None:
    instructions = decode_function(targets, "redzone", "rz_sum")
    formatter = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
    text = [formatter.format(i) for i in instructions]
    assert not any(
        i.flow_control in (iced_x86.FlowControl.CALL, iced_x86.FlowControl.INDIRECT_CALL)
        for i in instructions
    )
    assert not any(re.match(r"(sub|add) rsp|push|pop", t) for t in text), text
    assert sum("[rsp-" in t for t in text) == 28  # 14 stores and 14 loads


# --- protocols ----------------------------------------------------------------


@pytest.mark.parametrize("name", VULN_TARGETS)
def test_copy_packet_protocol(start: StartTarget, name: str) -> None:
    t = start(name)
    for n in (0, 10, 64, 65, 100, 4096, -1, -5):
        assert t.cmd(f"call {n}") == str(copy_packet(n))


def test_vuln_lib_main_maps_the_library(start: StartTarget, targets: Targets) -> None:
    t = start("vuln_lib_main")
    maps = Path(f"/proc/{t.pid}/maps").read_text()
    assert str(targets.libvuln) in maps


@pytest.mark.parametrize("name", PROGRAMS)
def test_unknown_command_quit_and_eof(start: StartTarget, targets: Targets, name: str) -> None:
    t = start(name)
    assert t.cmd("frobnicate").startswith("error unknown command")
    assert t.cmd("quit") == "bye"
    assert t.proc.wait(timeout=30) == 0
    t = start(name)
    assert t.proc.stdin is not None
    t.proc.stdin.close()
    assert t.proc.wait(timeout=30) == 0


def test_threads(start: StartTarget) -> None:
    t = start("threads", "8")
    assert t.cmd("tids") == "tids 9"
    assert t.cmd("call 10") == "21"
    first = parse_stats(t.cmd("stats"))
    assert first["calls"] >= 8
    assert t.cmd("sync") == "synced"
    second = parse_stats(t.cmd("stats"))
    assert second["calls"] >= first["calls"] + 16
    assert second["new"] == second["bad"] == 0
    assert t.cmd("park") == "parked 8"
    parked = parse_stats(t.cmd("stats"))
    assert parse_stats(t.cmd("stats")) == parked
    assert t.cmd("unpark") == "unparked"
    assert t.cmd("sync") == "synced"
    assert t.close() == 0


def test_threads_idle_many(start: StartTarget) -> None:
    t = start("threads", "500", "2", "idle")
    assert t.cmd("tids") == "tids 501"
    assert parse_stats(t.cmd("stats")) == {"calls": 500, "old": 500, "new": 0, "bad": 0}
    assert t.close() == 0


def test_redzone(start: StartTarget) -> None:
    t = start("redzone")
    for n in (0, 10, -3, 1 << 40):
        assert t.cmd(f"call {n}") == str(14 * n + 91)


RELOC_EXPECTED: dict[str, Callable[[int], int]] = {
    "reloc_fn": lambda n: -42 if n == 42 else 3 * n + 1007,
    "reloc_rip": lambda n: n + 1000,
    "reloc_rip_imm": lambda n: n + 2000,
    "reloc_jcc": lambda n: -100 if n == 0 else 5 * n,
    "reloc_call": lambda n: 3 * n + 7,
    "reloc_jrcxz": lambda n: -5 if n == 0 else n + 5,
    "reloc_loop": lambda n: -6 if n == 1 else n + 6,
}


def test_reloc(start: StartTarget) -> None:
    t = start("reloc")
    for n in (0, 1, 10, 42, -7):
        assert t.cmd(f"call {n}") == str(RELOC_EXPECTED["reloc_fn"](n))
        for name, expected in RELOC_EXPECTED.items():
            assert t.cmd(f"{name} {n}") == str(expected(n)), (name, n)


def test_blocker(start: StartTarget) -> None:
    t = start("blocker")
    tid = int(t.cmd("state").split()[1])
    assert t.cmd("state") == f"reader {tid} syscall 0"
    syscall = Path(f"/proc/{t.pid}/task/{tid}/syscall").read_text().split()
    assert syscall[0] == "0"  # blocked in read(2)
    assert t.cmd("feed hello world") == "read hello world"
    assert t.cmd("call 10") == "10"
    assert t.cmd("feed x") == "read x"
    assert t.cmd("state") == f"reader {tid} syscall 0"


def test_forker(start: StartTarget) -> None:
    t = start("forker")
    assert t.cmd("call 10") == "10"
    assert t.cmd("fork 10") == "child 10"
    assert t.cmd("fork 100") == "child -2"
    pid = int(t.cmd("spawn").split()[1])
    assert Path(f"/proc/{pid}").exists()
    assert t.cmd("ccall 10") == "ccall 10"
    assert t.cmd("ccall 65") == "ccall -2"
    assert t.cmd("reap") == "reaped exit 0"
    assert t.cmd("reap") == "error no child"
    assert t.cmd("ccall 1") == "error no child"


def test_twofuncs(start: StartTarget) -> None:
    t = start("twofuncs")
    for n in (0, 5, -5):
        assert t.cmd(f"a {n}") == str(n + 1000)
        assert t.cmd(f"b {n}") == str(7 * n - 3)


def test_branchy(start: StartTarget) -> None:
    t = start("branchy")
    for n in (0, 1, 10, 100, -5):
        assert t.cmd(f"call {n}") == str(max(n, 0) * (max(n, 0) + 1) // 2)


def test_seccomp(start: StartTarget) -> None:
    t = start("seccomp")
    assert t.cmd("seccomp") == "seccomp 2"
    assert t.cmd("trymmap") == "mmap EPERM"
    assert t.cmd("trymemfd") == "memfd EPERM"
    assert t.cmd("call 10") == "10"
    assert t.cmd("call 100") == "-2"
    status = Path(f"/proc/{t.pid}/status").read_text()
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)


def test_spinner(start: StartTarget) -> None:
    t = start("spinner")
    assert t.cmd("call 10") == "31"
    assert t.cmd("sync") == "synced"
    stats = parse_stats(t.cmd("stats"))
    assert stats["old"] > 0 and stats["new"] == stats["bad"] == 0
    tid = int(t.cmd("stick").split()[1])
    assert Path(f"/proc/{t.pid}/task/{tid}/syscall").read_text().split()[0] == "0"
    assert t.cmd("tids") == "tids 6"
    assert t.cmd("unstick") == "unstuck 1"
    assert t.cmd("park") == "parked 4"
    assert t.cmd("unpark") == "unparked"
    assert t.cmd("stick").startswith("stuck ")
    assert t.close() == 0  # quit unsticks


# --- harness ------------------------------------------------------------------


def test_target_reports_early_exit_with_stderr(tmp_path: Path) -> None:
    script = tmp_path / "dies"
    script.write_text("#!/bin/sh\necho 'something broke' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(TargetError, match=r"(?s)exited 3.*something broke"):
        Target(script, timeout=10)


def test_target_reports_timeout(tmp_path: Path) -> None:
    script = tmp_path / "silent"
    script.write_text("#!/bin/sh\necho ready $$\nexec sleep 60\n")
    script.chmod(0o755)
    t = Target(script, timeout=10)
    with pytest.raises(TargetError, match=r"no answer within 0.2 s"):
        t.cmd("call 1", timeout=0.2)
    assert t.alive()
    assert t.close(timeout=0.2) == -9  # ignored quit: killed
    assert not t.alive()


def test_target_reports_a_crash(start: StartTarget) -> None:
    t = start("vuln_pie")
    os.kill(t.pid, 11)
    with pytest.raises(TargetError, match="killed by SIGSEGV"):
        t.cmd("call 1")
