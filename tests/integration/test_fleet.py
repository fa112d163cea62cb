"""Issue 7.4: `--all` touches only the processes it concerns, found without stopping any.

Two programs with different names load one copy of libvuln.so from the test's
own directory, so `--exe "TMP/*"` keeps every command away from processes of
other test runs on this host."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from micropatch import live
from micropatch.cli.main import app
from micropatch.live import engine, selection

from .patching import make_patch, patch_source

# copy_packet: `call 65` answers -2 ("would have overflowed"); FIX makes it -1.
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}


@pytest.fixture
def programs(targets, tmp_path) -> dict[str, Path]:
    """vuln_pie_copy and other_prog: two executables sharing tmp_path/libvuln.so."""
    shutil.copy(targets.libvuln, tmp_path / "libvuln.so")
    paths = {}
    for name in ("vuln_pie_copy", "other_prog"):
        paths[name] = tmp_path / name
        shutil.copy(targets.vuln_lib_main, paths[name])
    return paths


@pytest.fixture
def stops(monkeypatch) -> list[int]:
    """The pids the engine stops, in order."""
    stopped: list[int] = []
    real = engine.stop_world

    def spy(pid, *args, **kwargs):
        stopped.append(pid)
        return real(pid, *args, **kwargs)

    monkeypatch.setattr(engine, "stop_world", spy)
    return stopped


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["micropatch", *args], capture_output=True, text=True, timeout=120)


def _source(tmp_path: Path, id: str = "fleet-fix", version: int = 1) -> Path:
    path = tmp_path / f"{id}-v{version}.toml"
    path.write_text(patch_source(tmp_path / "libvuln.so", [FIX], id=id, version=version))
    return path


def test_apply_all_with_exe_touches_only_the_matching_program(start, tmp_path, programs):
    a, b = start(programs["vuln_pie_copy"]), start(programs["other_prog"])
    done = _run("apply", str(_source(tmp_path)), "--allow-unsigned", "--all",
                "--exe", f"{tmp_path}/*vuln_pie*")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"in pid {a.pid}" in done.stdout and str(b.pid) not in done.stdout
    assert "apply: 1 done, 0 failed, 0 skipped, 0 gone" in done.stdout
    assert (a.cmd("call 65"), b.cmd("call 65")) == ("-1", "-2")
    again = _run("apply", str(_source(tmp_path)), "--allow-unsigned", "--all", "--exe", f"{tmp_path}/*")  # fmt: skip
    assert again.returncode == 0, again.stderr  # a already carries it: skipped, b patched
    assert "apply: 1 done, 0 failed, 1 skipped, 0 gone" in again.stdout
    assert b.cmd("call 65") == "-1"


def test_dry_run_lists_and_touches_nothing(start, tmp_path, programs):
    a, b = start(programs["vuln_pie_copy"]), start(programs["other_prog"])
    source = str(_source(tmp_path))
    listed = _run("apply", source, "--allow-unsigned", "--all", "--exe", f"{tmp_path}/*", "--dry-run")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split("\t") == ["pid", "exe", "user", "unit", "applied"]
    rows = sorted(line.split("\t")[:2] for line in lines[1:3])
    assert rows == sorted([[str(a.pid), str(programs["vuln_pie_copy"])], [str(b.pid), str(programs["other_prog"])]])  # fmt: skip
    assert "apply --dry-run: would touch 2 processes, 0 skipped, 0 gone" in listed.stdout
    assert live.status(a.pid) == live.status(b.pid) == []
    assert (a.cmd("call 65"), b.cmd("call 65")) == ("-2", "-2")

    live.apply(make_patch(tmp_path / "libvuln.so", [FIX], id="fleet-fix"), a.pid)
    removal = _run("remove", "fleet-fix", "--all", "--exe", f"{tmp_path}/*", "--dry-run")
    assert removal.returncode == 0, removal.stderr
    assert removal.stdout.splitlines()[1].split("\t")[::4] == [str(a.pid), "1"]
    assert "would touch 1 process, 0 skipped" in removal.stdout
    assert a.cmd("call 65") == "-1"  # still applied
    nobody = _run("remove", "fleet-fix", "--all", "--exe", f"{tmp_path}/*", "--user", "65534", "--dry-run")  # fmt: skip
    assert "would touch 0 processes" in nobody.stdout


def test_remove_all_stops_only_the_processes_that_carry_the_patch(start, tmp_path, programs, stops):
    carrier, other, bare = (start(programs["vuln_pie_copy"]), start(programs["other_prog"]),
                            start(programs["other_prog"]))  # fmt: skip
    module = tmp_path / "libvuln.so"
    live.apply(make_patch(module, [FIX], id="fleet-fix"), carrier.pid)
    live.apply(make_patch(module, [FIX], id="another-fix"), other.pid)
    stops.clear()
    result = CliRunner().invoke(app, ["remove", "fleet-fix", "--all", "--exe", f"{tmp_path}/*"])
    assert result.exit_code == 0, result.output
    assert stops == [carrier.pid]  # `other` has a cave but not this patch: never stopped
    assert "remove: 1 done, 0 failed, 1 skipped, 0 gone" in result.output
    assert [s.patch_id for s in live.status(other.pid)] == ["another-fix"]
    assert live.status(carrier.pid) == live.status(bare.pid) == []


def test_update_all_stops_only_older_versions(start, tmp_path, programs, stops):
    old, current = start(programs["vuln_pie_copy"]), start(programs["other_prog"])
    module = tmp_path / "libvuln.so"
    live.apply(make_patch(module, [FIX], id="fleet-fix", version=1), old.pid)
    live.apply(make_patch(module, [FIX], id="fleet-fix", version=2), current.pid)
    stops.clear()
    v2 = str(_source(tmp_path, version=2))
    result = CliRunner().invoke(app, ["update", v2, "--allow-unsigned", "--all", "--exe", f"{tmp_path}/*"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stops == [old.pid]
    assert "update: 1 done, 0 failed, 1 skipped, 0 gone" in result.output
    assert [s.version for s in live.status(old.pid)] == [2]


def test_a_process_gone_after_the_scan_is_not_a_failure(start, tmp_path, programs, monkeypatch):
    a, b = start(programs["vuln_pie_copy"]), start(programs["other_prog"])
    module = tmp_path / "libvuln.so"
    for t in (a, b):
        live.apply(make_patch(module, [FIX], id="fleet-fix"), t.pid)
    real = selection.for_remove

    def scan_then_exit(*args, **kwargs):
        chosen = real(*args, **kwargs)
        a.kill()  # exits between the scan and its operation
        return chosen

    monkeypatch.setattr(selection, "for_remove", scan_then_exit)
    result = CliRunner().invoke(app, ["remove", "fleet-fix", "--all", "--exe", f"{tmp_path}/*"])
    assert result.exit_code == 0, result.output
    assert "remove: 1 done, 0 failed, 0 skipped, 1 gone" in result.output
    assert live.status(b.pid) == []


def test_filters_need_all(tmp_path):
    refused = _run("remove", "x", "--pid", "1", "--exe", "*")
    assert refused.returncode == 1 and "use them with --all" in refused.stderr
    unknown = _run("remove", "x", "--all", "--user", "no-such-user-here")
    assert unknown.returncode == 1 and "no such user" in unknown.stderr
