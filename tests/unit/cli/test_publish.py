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
