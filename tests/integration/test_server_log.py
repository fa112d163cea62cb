"""What `micropatch server run` says as it starts: its own lines and uvicorn's, not
the migration library's setup chatter (`alembic.runtime.plugins: setup plugin …`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .test_server import free_port, micropatch


def test_start_says_what_matters(tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = micropatch("repo", "init", data / "repository", "--offline-dir", tmp_path / "off",
                      "--online-targets")  # fmt: skip
    assert done.returncode == 0, done.stderr
    process = subprocess.Popen(
        ["micropatch", "server", "run", "--data-dir", data, "--listen", f"127.0.0.1:{free_port()}"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail("the server did not start:\n" + "".join(seen))
    finally:
        process.terminate()
        process.wait(timeout=30)
    log = "".join(seen)
    assert "micropatch.server.database: database sqlite:///" in log and "at revision" in log, log
    assert "alembic" not in log, log
