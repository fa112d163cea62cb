"""The `micropatch` command as a process: what each verb imports and starts, and
that what it prints keeps every bracket of a message.

Each run goes through a small wrapper that records, with an audit hook, every
process the command starts, and prints the modules loaded at the end: the
command itself is `micropatch.cli.entry.main`, as the console script runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from micropatch.build.artifact import build as build_artifact
from micropatch.trust.keys import generate_key, load_private_key, write_key_pair

from .patching import assert_untouched, patch_source

FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}

WRAPPER = """
import json, sys
spawned = []
def hook(event, args):
    if event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec", "os.system"):
        spawned.append([event, repr(args[:2])[:200]])
sys.addaudithook(hook)
sys.argv = ["micropatch", *sys.argv[1:]]
from micropatch.cli.entry import main
try:
    main()
finally:
    print("\\n@@" + json.dumps({"modules": sorted(sys.modules), "spawned": spawned}), file=sys.stderr)
"""

# What no process command may load (issue 18.1): the CLI framework (--help and
# mistakes only), the patch models, and for remove and status the assembler, the
# C toolchain, the ELF parser and the crypto as well.
NEVER = ("pydantic", "typer", "click", "rich", "micropatch.patch.model",
         "micropatch.patch.source", "micropatch.trust.payload", "micropatch.trust.artifact")  # fmt: skip
NOT_FOR_READING = ("keystone", "elftools", "cryptography", "micropatch.bodies",
                   "micropatch.build", "iced_x86")  # fmt: skip
# What applying a signed artifact whose trampolines are precomputed does not load
# either: it checks the signature (cryptography) and fills the templates in.
NOT_FOR_APPLYING = tuple(n for n in NOT_FOR_READING if n != "cryptography")


class Run:
    def __init__(self, done: subprocess.CompletedProcess[str]) -> None:
        self.returncode = done.returncode
        self.stdout = done.stdout
        text, _, record = done.stderr.rpartition("\n@@")
        self.stderr = text
        data = json.loads(record)
        self.modules: list[str] = data["modules"]
        self.spawned: list[list[str]] = data["spawned"]

    def others(self) -> list[list[str]]:
        """What was spawned besides the stop watchdog's supervisor (process/watchdog.py)."""
        return [s for s in self.spawned if not (s[0] == "os.posix_spawn" and "'-I', '-S'" in s[1])]

    def loaded(self, names: tuple[str, ...]) -> list[str]:
        return [
            m for m in self.modules if m in names or m.startswith(tuple(f"{n}." for n in names))
        ]


def micropatch(*args: object, env: dict[str, str] | None = None) -> Run:
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *map(str, args)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MICROPATCH_NO_AGENT": "1", "COLUMNS": "250", **(env or {})},
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return Run(done)


@pytest.fixture
def signed(targets, tmp_path) -> tuple[Path, dict[str, str]]:
    """A signed artifact of FIX for vuln_pie, and the environment that trusts its key."""
    trust = tmp_path / "trusted"
    trust.mkdir()
    write_key_pair(generate_key("dev", expires_days=30), tmp_path / "dev")
    (tmp_path / "dev.pub").rename(trust / "dev.pub")
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX]))
    built = build_artifact(source, targets.vuln_pie).signed(load_private_key(tmp_path / "dev.key"))
    return built.write(tmp_path), {"MICROPATCH_TRUST_DIR": str(trust)}


def test_apply_status_remove_load_only_what_they_use_and_start_only_their_watchdog(
    targets, start, signed
):
    t = start("vuln_pie")
    artifact, env = signed
    applied = micropatch("apply", artifact, "--pid", t.pid, env=env)
    assert applied.returncode == 0, applied.stderr
    assert f"applied test-fix v1 (1 site) in pid {t.pid}" in applied.stdout
    assert f"verified {artifact}: test-fix v1 for vuln_pie" in applied.stdout
    assert t.cmd("call 65") == "-1"
    assert applied.loaded(NEVER + NOT_FOR_APPLYING) == []
    # no `ldconfig -p` (ctypes.util.find_library), no compiler: the stop watchdog alone
    assert applied.others() == [] and len(applied.spawned) == 1

    shown = micropatch("status", "--pid", t.pid)
    assert shown.returncode == 0, shown.stderr
    [header, row] = shown.stdout.splitlines()
    assert header.split("\t")[:5] == ["pid", "process", "module", "patch", "version"]
    assert row.split("\t")[3:5] == ["test-fix", "1"]
    assert shown.loaded(NEVER + NOT_FOR_READING) == [] and shown.spawned == []

    removed = micropatch("remove", "test-fix", "--pid", t.pid)
    assert removed.returncode == 0, removed.stderr
    assert f"removed test-fix (1 site) in pid {t.pid}" in removed.stdout
    assert removed.loaded(NEVER + NOT_FOR_READING) == [] and removed.others() == []
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])

    # every patched process: none now
    everything = micropatch("status")
    assert everything.returncode == 0 and everything.loaded(NEVER + NOT_FOR_READING) == []


def test_help_and_mistakes_go_to_typer_with_the_same_declaration(targets, start):
    helped = micropatch("apply", "--help")
    assert helped.returncode == 0 and "--stop-timeout" in helped.stdout
    assert "--lock-timeout" in helped.stdout and "PATCH_FILE" in helped.stdout
    wrong = micropatch("remove", "fix", "--pid", "seven")
    assert wrong.returncode == 2 and "'seven' is not a valid integer" in wrong.stderr
    below = micropatch("apply", "x.mpatch", "--all", "--stop-timeout", "0")
    assert below.returncode == 2 and "0.001" in below.stderr
    t = start("vuln_pie")
    none = micropatch("remove", "fix", "--pid", t.pid, "--dry-run")
    assert none.returncode == 1
    assert "--dry-run choose among --all; use them with --all instead of --pid" in none.stderr


def test_an_error_message_keeps_its_brackets(targets, start, tmp_path):
    """Messages carry operands (`[rsp+0x8]`) and markup-like words (`[red]`); a
    process command prints them as they are."""
    t = start("vuln_pie")
    source = tmp_path / "odd.toml"
    # A title is shown by nothing here; an `at` that names no symbol is quoted back.
    source.write_text(patch_source(targets.vuln_pie, [{"at": "no_such[red]fn", "code": ""}]))
    done = micropatch("apply", source, "--pid", t.pid, "--allow-unsigned")
    assert done.returncode == 1
    assert "[red]" in done.stderr, done.stderr
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_build_messages_keep_their_brackets_and_o_makes_a_directory(targets, tmp_path):
    # A body that pushes at a site where the red zone is live runs below it, so its
    # [rsp+N] operands are refused: the message explains with [rsp+N] and [frame+N].
    source = tmp_path / "rz.toml"
    source.write_text(patch_source(
        targets.redzone, [{"at": "rz_sum+0x7a", "code": "push rax\nmov rax, [rsp+8]\npop rax"}],
    ))  # fmt: skip
    done = subprocess.run(
        ["micropatch", "build", str(source), "--module", str(targets.redzone)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "500"},
    )  # fmt: skip
    assert done.returncode == 1
    message = " ".join(done.stderr.split())
    assert "`mov rax,[rsp+8]` (body+0x1)" in message, done.stderr
    assert "write the function's [rsp+N] as [frame+N]" in message

    fine = tmp_path / "fix.toml"
    fine.write_text(patch_source(targets.vuln_pie, [FIX]))
    out = tmp_path / "new" / "dir"
    done = subprocess.run(
        ["micropatch", "build", str(fine), "--module", str(targets.vuln_pie), "-o", f"{out}/"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.is_dir() and [p.suffix for p in out.iterdir()] == [".mpatch"]
    # without the slash, a missing path is the file to write
    done = subprocess.run(
        ["micropatch", "build", str(fine), "--module", str(targets.vuln_pie), "-o", str(tmp_path / "one.mpatch")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and (tmp_path / "one.mpatch").is_file()


def test_any_other_command_builds_only_its_own_part_of_the_cli(tmp_path):
    others = ("micropatch.cli.authoring", "micropatch.cli.server", "micropatch.cli.tools",
              "micropatch.cli.dev", "micropatch.cli.change", "micropatch.cli.status")  # fmt: skip
    asked = micropatch("agent", "status", "--socket", tmp_path / "none.sock")
    assert asked.returncode == 1 and "no agent answers on" in asked.stderr
    assert "micropatch.cli.agent" in asked.modules and asked.loaded(others) == []
    helped = micropatch("--help")  # every command, with its help
    for name in ("apply", "status", "repair", "build", "agent", "explore", "publish"):
        assert f" {name} " in helped.stdout


def test_update_of_a_patch_not_applied_says_how_to_apply_it(targets, start, signed):
    """The advice is a command that works: with the keys the update was given."""
    t = start("vuln_pie")
    artifact, env = signed
    key = Path(env["MICROPATCH_TRUST_DIR"]) / "dev.pub"
    done = micropatch("update", artifact, "--pid", t.pid, "--trust", key)
    assert done.returncode == 1
    message = " ".join(done.stderr.split())
    assert f"patch test-fix is not applied to process {t.pid}" in message, done.stderr
    assert f"use `micropatch apply {artifact} --pid {t.pid} --trust {key}`" in message, message
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
