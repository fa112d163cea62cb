"""`micropatch server admin …` works on a server's data directory: one without a
repository (a mistyped --data-dir, or `repo init` not run yet) is refused, and no
database is made there."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from micropatch.cli.main import app

pytest.importorskip("sqlalchemy")


@pytest.mark.parametrize(
    "command",
    [["create-group", "/prod"], ["enrollment-token", "--group", "/prod"], ["list-users"]],
)
def test_a_data_directory_without_a_repository_is_refused(
    tmp_path: Path, command: list[str]
) -> None:
    typo = tmp_path / "srv" / "mpp"
    result = CliRunner().invoke(app, ["server", "admin", *command, "--data-dir", str(typo)])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert f"create one with `micropatch repo init {typo}/repository`" in out, out
    assert f"(is {typo} the server's --data-dir?)" in out, out
    assert not typo.exists()
