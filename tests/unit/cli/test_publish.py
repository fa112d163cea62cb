"""`micropatch publish` refuses what is not an artifact before it sends anything."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from micropatch.cli.main import app

SOURCE = """[patch]
id = "my-fix"
version = 1

[target]
module = "libfoo.so.1"
build_id = "dd6f116b3f97f43fc7fc64d3bd428ec88b57435d"

[[patchlet]]
at = "set_name"
code = ""
"""


def test_a_patch_source_is_refused_before_any_request(tmp_path: Path) -> None:
    source = tmp_path / "fix.toml"
    source.write_text(SOURCE)
    # Port 9 (discard) on loopback: nothing listens; a request would say "refused".
    result = CliRunner().invoke(
        app, ["publish", str(source), "--server", "http://127.0.0.1:9", "--token", "mpu_x"]
    )
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert f"{source} is a patch source" in out, out
    assert f"micropatch build {source} --module MODULE_FILE --key KEY.key" in out, out
    assert "Connection refused" not in out


def test_an_unsigned_artifact_is_refused_before_any_request(tmp_path: Path, targets) -> None:
    from integration.patching import patch_source

    from micropatch.build.artifact import build

    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [{"at": "copy_packet", "code": ""}]))
    unsigned = build(source, targets.vuln_pie).write(tmp_path)
    result = CliRunner().invoke(
        app, ["publish", str(unsigned), "--server", "http://127.0.0.1:9", "--token", "mpu_x"]
    )
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert f"{unsigned}: is not signed, and a fleet server takes only signed artifacts" in out
    assert f"`micropatch sign {unsigned} --key KEY.key`" in out, out
    assert "Connection refused" not in out


def test_the_unsigned_hint_names_a_file_or_a_placeholder() -> None:
    import pytest

    from micropatch.errors import SignatureError
    from micropatch.trust.signatures import verify_signatures

    with pytest.raises(SignatureError, match=r"sign it with `micropatch sign ARTIFACT.mpatch "):
        verify_signatures("the uploaded artifact", b"{}", [], [])


def test_a_server_that_does_not_answer_is_said_so(tmp_path: Path, targets) -> None:
    from integration.patching import patch_source

    from micropatch.build.artifact import build
    from micropatch.trust.keys import generate_key

    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [{"at": "copy_packet", "code": ""}]))
    built = build(source, targets.vuln_pie).signed(generate_key("dev", expires_days=1))
    artifact = built.write(tmp_path)
    result = CliRunner().invoke(
        app, ["publish", str(artifact), "--server", "http://127.0.0.1:9", "--token", "mpu_x"]
    )
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "http://127.0.0.1:9: cannot connect" in out and "is a fleet server listening" in out, out


def test_what_is_not_an_artifact_is_refused_before_any_request(tmp_path: Path) -> None:
    fake = tmp_path / "fake.mpatch"
    fake.write_text('{"id": "x", "payload": {}, "signatures": []}')
    result = CliRunner().invoke(
        app, ["publish", str(fake), "--server", "http://127.0.0.1:9", "--token", "mpu_x"]
    )
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert f"{fake}: payload.format" in out and "not a micropatch artifact" in out, out
    assert "cannot connect" not in out
