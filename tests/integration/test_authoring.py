"""The authoring toolchain through the real CLI: keys, build, sign, verify, the apply
policy, inspect, on live targets."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from micropatch.build.artifact import build as build_artifact
from micropatch.trust import artifact
from micropatch.trust.artifact import canonical_json
from micropatch.trust.keys import generate_key, load_private_key, write_key_pair

from .patching import assert_untouched, patch_source

# copy_packet: `call 65` answers -2 ("would have overflowed"); v1 makes it -1, v2 64.
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
FIX_V2 = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, 64\nok:"}


def micropatch(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None):
    done = subprocess.run(
        ["micropatch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "250", **(env or {})},
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A key pair: tmp_path/keys/dev.key and dev.pub (the CLI's own is tested below)."""
    (tmp_path / "keys").mkdir()
    write_key_pair(generate_key("dev", expires_days=30), tmp_path / "keys" / "dev")
    return tmp_path / "keys"


def build(
    tmp_path: Path, module: Path, patchlets, key: Path | None = None, *, name: str = "fix", **kw
) -> Path:
    """A built artifact in tmp_path/NAME/ (through the library: `build` runs through
    the CLI in the tests that are about it)."""
    source = tmp_path / f"{name}.toml"
    source.write_text(patch_source(module, patchlets, **kw))
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    built = build_artifact(source, module)
    if key is not None:
        built = built.signed(load_private_key(key))
    return built.write(out)


def test_keys_generate(tmp_path: Path) -> None:
    keys = tmp_path
    done = micropatch("keys", "generate", keys / "dev", "--expires", "30")
    assert done.returncode == 0, done.stderr
    private, public = keys / "dev.key", keys / "dev.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    document = json.loads(public.read_text())
    assert document["keyid"] == hashlib.sha256(bytes.fromhex(document["public_key"])).hexdigest()
    assert document["algorithm"] == "ed25519" and document["expires"].endswith("Z")
    again = micropatch("keys", "generate", keys / "dev")
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr


def test_build_verify_apply_inspect_remove(targets, start, tmp_path) -> None:
    t = start("vuln_pie")
    keys = tmp_path / "keys"
    keys.mkdir()
    done = micropatch("keys", "generate", keys / "dev", "--expires", "30")
    assert done.returncode == 0, done.stderr
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX]))
    done = micropatch(
        "build", source, "--module", targets.vuln_pie, "--key", keys / "dev.key", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    [built] = tmp_path.glob("*.mpatch")  # the default name, in the current directory
    assert "built test-fix v1 for vuln_pie" in done.stdout and "copy_packet" in done.stdout
    loaded = artifact.load(built)
    assert built.name == f"test-fix-v1-{loaded.id[:12]}.mpatch"
    assert f"artifact id {loaded.id}" in done.stdout and "signed by key 'dev'" in done.stdout

    verified = micropatch("verify", built, "--trust", keys / "dev.pub")
    assert verified.returncode == 0, verified.stderr
    keyid = json.loads((keys / "dev.pub").read_text())["keyid"]
    assert "verified" in verified.stdout and keyid in verified.stdout
    assert loaded.id in verified.stdout and "copy_packet (0x" in verified.stdout

    applied = micropatch("apply", built, "--pid", t.pid, "--trust", keys / "dev.pub")
    assert applied.returncode == 0, applied.stderr
    assert "verified" in applied.stdout and "applied test-fix v1" in applied.stdout
    assert (t.cmd("call 65"), t.cmd("call 10")) == ("-1", "10")

    shown = micropatch("inspect", built, "--pid", t.pid)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"applied to process {t.pid}" in out
    assert "test esi,esi" in out  # the original instructions, from the registry
    assert "jmp" in out and "trampoline+0x0" in out  # the jump written over the site
    assert "cmp esi,0x40" in out and "copy_packet+0xb6" in out  # body; relocated js, resolved
    assert "copy_packet+0x8" in out  # the way back

    removed = micropatch("remove", "test-fix", "--pid", t.pid)
    assert removed.returncode == 0, removed.stderr
    assert t.cmd("call 65") == "-2"
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
    shown = micropatch("inspect", built, "--pid", t.pid)
    assert shown.returncode == 0 and f"not applied to process {t.pid}" in shown.stdout


def test_trust_directory(targets, start, tmp_path, keys) -> None:
    t = start("vuln_pie")
    built = build(tmp_path, targets.vuln_pie, [FIX], keys / "dev.key")
    (keys / "dev.key").unlink()  # the directory holds only public keys
    done = micropatch("apply", built, "--pid", t.pid, env={"MICROPATCH_TRUST_DIR": str(keys)})
    assert done.returncode == 0, done.stderr
    assert t.cmd("call 65") == "-1"
    micropatch("remove", "test-fix", "--pid", t.pid)

    empty = tmp_path / "empty"
    empty.mkdir()
    done = micropatch("apply", built, "--pid", t.pid, env={"MICROPATCH_TRUST_DIR": str(empty)})
    assert done.returncode == 1
    assert "no trusted keys in" in done.stderr and "--trust" in done.stderr
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_unsigned_source_needs_the_development_flag(targets, start, tmp_path) -> None:
    t = start("vuln_pie")
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX]))
    refused = micropatch("apply", source, "--pid", t.pid)
    assert refused.returncode == 1
    assert "is a patch source, and only signed artifacts are applied" in refused.stderr
    assert "micropatch build" in refused.stderr and "--allow-unsigned" in refused.stderr
    assert t.cmd("call 65") == "-2"
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
    refused = micropatch("update", source, "--pid", t.pid)
    assert refused.returncode == 1 and "only signed artifacts" in refused.stderr

    allowed = micropatch("apply", source, "--pid", t.pid, "--allow-unsigned")
    assert allowed.returncode == 0, allowed.stderr
    assert "warning: applying the unsigned patch source" in allowed.stderr
    assert t.cmd("call 65") == "-1"


def test_refused_artifacts_leave_the_target_untouched(targets, start, tmp_path, keys) -> None:
    t = start("vuln_pie")
    trust = ("--trust", keys / "dev.pub")

    unsigned = build(tmp_path, targets.vuln_pie, [FIX], name="unsigned")
    done = micropatch("apply", unsigned, "--pid", t.pid, *trust)
    assert done.returncode == 1 and "is not signed" in done.stderr

    stranger = write_key_pair(generate_key("stranger"), tmp_path / "stranger")[0]
    foreign = build(tmp_path, targets.vuln_pie, [FIX], stranger, name="foreign")
    done = micropatch("apply", foreign, "--pid", t.pid, *trust)
    assert done.returncode == 1 and "which is not trusted" in done.stderr
    assert "(trusted: dev (" in done.stderr

    good = build(tmp_path, targets.vuln_pie, [FIX], keys / "dev.key", name="good")
    document = json.loads(good.read_text())
    payload = document["payload"]
    payload["patch"]["source"] = payload["patch"]["source"].replace("mov esi, -1", "mov esi, 1")
    tampered = tmp_path / "tampered.mpatch"
    tampered.write_text(json.dumps(document))
    done = micropatch("apply", tampered, "--pid", t.pid, *trust)
    assert done.returncode == 1 and "modified or corrupted after it was built" in done.stderr
    document["id"] = hashlib.sha256(canonical_json(payload)).hexdigest()
    tampered.write_text(json.dumps(document))
    done = micropatch("apply", tampered, "--pid", t.pid, *trust)
    assert done.returncode == 1 and "was modified after it was signed" in done.stderr

    truncated = tmp_path / "truncated.mpatch"
    truncated.write_bytes(good.read_bytes()[:100])
    done = micropatch("apply", truncated, "--pid", t.pid, *trust)
    assert done.returncode == 1 and f"{truncated}: not an artifact: invalid JSON" in done.stderr

    assert t.cmd("call 65") == "-2"
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])

    # Development: an unsigned artifact is accepted with the flag, and a warning.
    done = micropatch("apply", unsigned, "--pid", t.pid, "--allow-unsigned", *trust)
    assert done.returncode == 0, done.stderr
    assert "without checking its signatures" in done.stderr and t.cmd("call 65") == "-1"


def test_expired_key(targets, tmp_path) -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    old = generate_key("old", expires_days=1, now=past)
    private, public = write_key_pair(old, tmp_path / "old")
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX]))
    signed = build_artifact(source, targets.vuln_pie).signed(old, past).write(tmp_path)
    done = micropatch("verify", signed, "--trust", public)
    assert done.returncode == 1
    assert (
        "signed by key 'old'" in done.stderr
        and "which expired on 2020-01-02T00:00:00Z" in done.stderr
    )
    done = micropatch(
        "build", source, "--module", targets.vuln_pie, "--key", private, "-o", tmp_path
    )
    assert done.returncode == 1 and "expired on 2020-01-02T00:00:00Z" in done.stderr


def test_malformed_key_files(targets, tmp_path, keys) -> None:
    built = build(tmp_path, targets.vuln_pie, [FIX], keys / "dev.key")
    bad = tmp_path / "bad.pub"
    bad.write_text('{"format": "micropatch-key", "format_version": 1, "algorithm": "ed25519"}')
    done = micropatch("verify", built, "--trust", bad)
    assert done.returncode == 1 and f"{bad}: malformed key file" in done.stderr
    done = micropatch("verify", built, "--trust", keys / "dev.key")
    assert done.returncode == 1 and "is a private key" in done.stderr
    source = tmp_path / "fix.toml"
    done = micropatch("build", source, "--module", targets.vuln_pie, "--key", keys / "dev.pub")
    assert done.returncode == 1 and "is not a private key" in done.stderr


def test_update_with_artifacts(targets, start, tmp_path, keys) -> None:
    t = start("vuln_pie")
    key, trust = keys / "dev.key", ("--trust", keys / "dev.pub")
    v1 = build(tmp_path, targets.vuln_pie, [FIX], key, name="v1")
    v2 = build(tmp_path, targets.vuln_pie, [FIX_V2], key, name="v2", version=2)
    assert micropatch("apply", v1, "--pid", t.pid, *trust).returncode == 0
    assert t.cmd("call 65") == "-1"
    shown = micropatch("inspect", v2, "--pid", t.pid)
    assert "version 1 of test-fix is applied there (this is v2)" in shown.stdout
    done = micropatch("update", v2, "--pid", t.pid, *trust)
    assert done.returncode == 0, done.stderr
    assert "updated test-fix v2" in done.stdout and t.cmd("call 65") == "64"
    micropatch("remove", "test-fix", "--pid", t.pid)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_shared_library(targets, start, tmp_path, keys) -> None:
    t = start("vuln_lib_main")
    built = build(tmp_path, targets.libvuln, [FIX], keys / "dev.key")
    done = micropatch("apply", built, "--pid", t.pid, "--trust", keys / "dev.pub")
    assert done.returncode == 0, done.stderr
    assert t.cmd("call 65") == "-1"
    shown = micropatch("inspect", built, "--pid", t.pid)
    assert "applied to process" in shown.stdout and "copy_packet+0x8" in shown.stdout
    micropatch("remove", "test-fix", "--pid", t.pid)
    assert_untouched(targets, "vuln_lib_main", t.pid, ["copy_packet"], targets.libvuln)


@pytest.mark.parametrize("name", ["vuln_pie", "vuln_nopie"])
def test_inspect_against_the_module_file(targets, tmp_path, keys, name) -> None:
    module = targets.path(name)
    built = build(tmp_path, module, [FIX], keys / "dev.key")
    shown = micropatch("inspect", built, "--module", module)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "original instructions" in out and "trampoline" in out
    assert "copy_packet+0x2" in out and "test esi,esi" in out and "cmp esi,0x40" in out
    assert "trampoline+0x0" in out and "int3" in out
    assert re.search(r"js 0x[0-9a-f]+  ; copy_packet\+0x[0-9a-f]+", out)  # references resolved
    facts = micropatch("inspect", built)
    assert facts.returncode == 0 and "test esi,esi" in facts.stdout and "--module" in facts.stdout
    both = micropatch("inspect", built, "--module", module, "--pid", "1")
    assert both.returncode == 1 and "not both" in both.stderr


def test_build_errors(targets, tmp_path, keys) -> None:
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX]))
    done = micropatch("build", source, "--module", targets.vuln_nopie, "-o", tmp_path)
    assert done.returncode == 1 and f"{targets.vuln_nopie} is not the build" in done.stderr
    source.write_text(patch_source(targets.vuln_pie, [{"at": "copy_packet+1", "code": ""}]))
    done = micropatch("build", source, "--module", targets.vuln_pie, "-o", tmp_path)
    assert done.returncode == 1
    assert "patchlet[0] (copy_packet+1)" in done.stderr and "inside the instruction" in done.stderr
    assert not list(tmp_path.glob("*.mpatch"))
    done = micropatch("build", source, "--module", targets.vuln_pie, "--key", tmp_path / "no.key")
    assert done.returncode == 1 and "cannot read key file" in done.stderr


def test_inspect_shows_blocked_attempts(targets, start, tmp_path, keys) -> None:
    """Issue 3: `inspect --pid` says whether the patch is applied, and its blocked counters."""
    t = start("vuln_pie")
    guard = {"at": "copy_packet", "when": "esi > 64", "then": "blocked; return -1"}
    built = build(tmp_path, targets.vuln_pie, [guard], keys / "dev.key")
    assert micropatch("apply", built, "--pid", t.pid, "--trust", keys / "dev.pub").returncode == 0
    assert [t.cmd("call 65"), t.cmd("call 99"), t.cmd("call 3")] == ["-1", "-1", "3"]
    shown = micropatch("inspect", built, "--pid", t.pid)
    assert shown.returncode == 0, shown.stderr
    assert "blocked exploit attempts: 2" in shown.stdout, shown.stdout
    assert micropatch("remove", "test-fix", "--pid", t.pid).returncode == 0


def test_c_body_runs_as_built_without_a_compiler(targets, start, tmp_path, keys) -> None:
    """The artifact carries the compiled C body: the applying host runs those signed
    bytes and needs no compiler (CC points at one that always fails)."""
    t = start("vuln_pie")
    c = (
        "#include <micropatch.h>\nmp_verdict patchlet(struct mp_regs *r) {\n"
        "  if ((int)r->rsi > 64) return MP_RETURN(-1);\n  return MP_CONTINUE;\n}\n"
    )
    built = build(tmp_path, targets.vuln_pie, [{"at": "copy_packet", "c": c}], keys / "dev.key")
    no_cc = {"CC": "/bin/false"}
    applied = micropatch("apply", built, "--pid", t.pid, "--trust", keys / "dev.pub", env=no_cc)
    assert applied.returncode == 0, applied.stderr
    assert (t.cmd("call 65"), t.cmd("call 10")) == ("-1", "10")
    assert micropatch("remove", "test-fix", "--pid", t.pid).returncode == 0


def test_status_of_a_pid_that_cannot_be_read_fails(tmp_path) -> None:
    """One line on stderr and exit 1; not also 'no micropatch applied' and exit 0."""
    done = micropatch("status", "--pid", 999999999)
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert "pid 999999999" in line and "does not exist" in line


def test_piped_errors_stay_on_one_line(targets, tmp_path) -> None:
    """Not hard-wrapped at 80 columns with trailing spaces when stderr is a pipe."""
    text = patch_source(targets.vuln_pie, [FIX], build="00" * 20)
    path = tmp_path / "fix.toml"
    path.write_text(text)
    done = subprocess.run(
        ["micropatch", "build", str(path), "-m", str(targets.vuln_pie)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert len(line) > 120 and line.startswith("error:") and "build against the exact" in line
    assert line == line.rstrip()


def test_update_of_a_patch_not_applied_suggests_apply(targets, start, tmp_path) -> None:
    t = start("vuln_pie")
    path = tmp_path / "fix.toml"
    path.write_text(patch_source(targets.vuln_pie, [FIX]))
    done = micropatch("update", path, "--pid", t.pid, "--allow-unsigned")
    assert done.returncode == 1
    assert f"use `micropatch apply {path} --pid {t.pid}`" in done.stderr
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


def test_inspect_labels_counter_body_and_displaced_code(targets, start, tmp_path) -> None:
    """The blocked-event counter reads as a data page, not a write into code; the
    trampoline column says which instructions are the body and which the displaced
    copy; the same against the module file and in the process."""
    t = start("vuln_pie")
    source = tmp_path / "guard.toml"
    guard = {"at": "copy_packet", "when": "esi > 64", "then": "blocked; return -1"}
    source.write_text(patch_source(targets.vuln_pie, [guard]))
    views = [micropatch("inspect", source, "--module", targets.vuln_pie)]
    assert micropatch("apply", source, "--pid", t.pid, "--allow-unsigned").returncode == 0
    views.append(micropatch("inspect", source, "--pid", t.pid))
    for done in views:
        assert done.returncode == 0, done.stderr
        text = done.stdout
        counted = [line for line in text.splitlines() if "blocked-event counter" in line]
        assert counted and all("lock inc" in line or "mov" in line for line in counted), text
        assert "body" in text and "displaced" in text and "back" in text, text
    micropatch("remove", "test-fix", "--pid", t.pid)


def test_build_and_inspect_piped_print_whole_ids_and_rows(targets, tmp_path) -> None:
    """Off a terminal (piped, COLUMNS unset) nothing is cut with `…` nor wrapped
    mid-token: a program reads the hashes, key ids and table rows whole."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}

    def piped(*args: object) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["micropatch", *map(str, args)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "…" not in done.stdout, done.stdout
        return done

    generated = piped("keys", "generate", tmp_path / "dev")
    keyid = json.loads((tmp_path / "dev.pub").read_text())["keyid"]
    assert f"generated key 'dev' ({keyid})" in generated.stdout
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX]))
    done = piped("build", source, "--module", targets.vuln_pie, "--key", tmp_path / "dev.key")
    sha256 = hashlib.sha256(targets.vuln_pie.read_bytes()).hexdigest()
    assert f"sha256 {sha256})" in done.stdout and f"signed by key 'dev' ({keyid})" in done.stdout
    [row] = [line for line in done.stdout.splitlines() if "copy_packet" in line]
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    [built] = tmp_path.glob("*.mpatch")
    site = artifact.load(built).payload.sites[0]
    assert cells == ["0", "copy_packet", f"{site.offset:#x}", f"{site.length} bytes",
                     site.original_bytes.hex(" "), "untouched", "after the site"]  # fmt: skip
    shown = piped("inspect", built)
    assert f"signatures by key {keyid} (" in shown.stdout
    shown = piped("inspect", built, "--module", targets.vuln_pie)
    assert "copy_packet" in shown.stdout
