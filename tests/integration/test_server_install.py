"""`micropatch server install` / `uninstall`: the unit systemd accepts, the options in
its ExecStart, a database password kept out of it, the refusals (nothing written),
and the unit's command line run for real: up, healthy, and stopped by SIGTERM in time."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from unit.server.conftest import signing_key  # noqa: F401 (fixture)

from micropatch.cli.server import GRACE
from micropatch.systemd import join

from .test_server import data_dir, free_port, micropatch  # noqa: F401 (fixture)

UNIT = "micropatch-server.service"


def directive(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def exec_start(text: str) -> list[str]:
    """ExecStart's words as systemd passes them (quotes, `%%` and `$$` undone)."""
    [line] = directive(text, "ExecStart")
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line)]


def environment_value(quoted: str) -> str:
    """A double-quoted value of an environment file, read as systemd reads it: a
    backslash before one of `"\\`$` keeps that character only."""
    assert quoted[0] == quoted[-1] == '"'
    value, chars = [], iter(quoted[1:-1])
    for c in chars:
        if c == "\\":
            following = next(chars)
            value.append(following if following in '"\\`$' else c + following)
        else:
            assert c != '"'
            value.append(c)
    return "".join(value)


def verify(unit: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    problems = [line for line in done.stderr.splitlines() if "micropatch-server" in line]
    assert not problems, done.stderr


def test_the_unit_runs_server_run_with_the_options_given(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    units = tmp_path / "units"
    database = f"sqlite:///{data_dir}/fleet.db"
    done = micropatch("server", "install", "--data-dir", data_dir, "--unit-dir", units,
                      "--listen", "0.0.0.0:8600", "--database", database,
                      "--checkin-interval", 30, "--repository-url", "https://cdn.example/mp%20r",
                      "--environment-file", tmp_path / "etc/server.env")  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = units / UNIT
    assert f"wrote {unit}" in done.stdout
    assert "systemctl daemon-reload && systemctl enable --now micropatch-server" in done.stdout
    text = unit.read_text()
    words = exec_start(text)
    assert Path(words[0]).is_absolute() and Path(words[0]).name == "micropatch"
    assert words[1:] == ["server", "run", "--data-dir", str(data_dir), "--listen", "0.0.0.0:8600",
                         "--database", database, "--checkin-interval", "30",
                         "--repository-url", "https://cdn.example/mp%20r"]  # fmt: skip
    assert not directive(text, "EnvironmentFile") and not (tmp_path / "etc").exists()
    for setting in ("Type=exec", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                    "PrivateTmp=yes", "Restart=on-failure", "KillSignal=SIGTERM",
                    f"TimeoutStopSec={GRACE + 10}", f"ReadWritePaths={data_dir}", "CapabilityBoundingSet=\n"):  # fmt: skip
        assert setting in text
    assert "ptrace" not in directive(text, "CapabilityBoundingSet")[0].lower()
    verify(unit)

    # Only what was given: the defaults stay `server run`'s own.
    again = micropatch("server", "install", "--data-dir", data_dir, "--unit-dir", units)
    assert again.returncode == 0, again.stderr
    assert exec_start(unit.read_text())[1:] == ["server", "run", "--data-dir", str(data_dir)]

    removed = micropatch("server", "uninstall", "--unit-dir", units)
    assert removed.returncode == 0 and f"removed {unit}" in removed.stdout
    assert not unit.exists() and (data_dir / "repository").is_dir()  # the data stays


def test_a_database_password_goes_to_a_root_only_file(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    units, env = tmp_path / "units", tmp_path / "etc/micropatch/server.env"
    url = 'postgresql://mp:pa$s"w%rd@db.example/fleet'
    done = micropatch("server", "install", "--data-dir", data_dir, "--unit-dir", units,
                      "--database", url, "--workers", 2, "--listen", "0.0.0.0:443",
                      "--environment-file", env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "pa$s" not in done.stdout + done.stderr
    text = (units / UNIT).read_text()
    assert "pa$s" not in text and "pa$$s" not in text and "--database" not in text
    assert exec_start(text)[-4:] == ["--listen", "0.0.0.0:443", "--workers", "2"]
    assert directive(text, "EnvironmentFile") == [str(env)]
    assert directive(text, "CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]  # port 443
    info = env.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    [line] = [ln for ln in env.read_text().splitlines() if not ln.startswith("#")]
    name, _, value = line.partition("=")
    assert name == "MICROPATCH_SERVER_DATABASE"
    assert environment_value(value) == url
    verify(units / UNIT)

    # Reinstalled without a password: the old file, and its password, go.
    again = micropatch("server", "install", "--data-dir", data_dir, "--unit-dir", units,
                       "--environment-file", env)  # fmt: skip
    assert again.returncode == 0 and not env.exists()
    assert micropatch("server", "install", "--data-dir", data_dir, "--unit-dir", units,
                      "--database", url, "--environment-file", env).returncode == 0  # fmt: skip
    removed = micropatch("server", "uninstall", "--unit-dir", units)
    assert removed.returncode == 0, removed.stderr
    assert not (units / UNIT).exists() and not env.exists()


def test_refusals_write_nothing(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    units, env = tmp_path / "units", tmp_path / "server.env"
    empty = tmp_path / "empty"
    empty.mkdir()
    done = micropatch("server", "install", "--data-dir", empty, "--unit-dir", units,
                      "--database", "postgresql://mp:secret@db/fleet", "--environment-file", env)  # fmt: skip
    assert done.returncode == 1 and "micropatch repo init" in done.stderr
    assert not units.exists() and not env.exists()
    for database in ([], ["--database", f"sqlite:///{tmp_path}/x.db"]):
        done = micropatch("server", "install", "--data-dir", data_dir, "--unit-dir", units,
                          "--workers", 2, *database)  # fmt: skip
        assert done.returncode == 1 and "--workers 2 needs --database postgresql://" in done.stderr
        assert not units.exists()
    done = micropatch("server", "install", "--data-dir", data_dir, "--unit-dir", units,
                      "--listen", "8600")  # fmt: skip
    assert done.returncode == 1 and "expected HOST:PORT" in done.stderr and not units.exists()


def test_the_units_command_serves_and_stops_on_sigterm(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    port = free_port()
    units = tmp_path / "units"
    done = micropatch("server", "install", "--data-dir", data_dir, "--unit-dir", units,
                      "--listen", f"127.0.0.1:{port}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    command = exec_start((units / UNIT).read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROPATCH_SERVER")}
    with open(tmp_path / "server.err", "wb") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "server.err").read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /api/v1/health"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)  # KillSignal=
        # uvicorn shuts down gracefully, then re-raises the signal it caught: systemd
        # counts an exit by SIGTERM as clean (no Restart=on-failure).
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)
        assert "Finished server process" in (tmp_path / "server.err").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


WORDS = ["plain", "a b", "100%", "$HOME", 'say "hi"', "back\\slash", "it's"]


@pytest.mark.parametrize("word", WORDS)
def test_unit_quoting_reads_back(word: str) -> None:
    [read] = [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(join([word]))]
    assert read == word
