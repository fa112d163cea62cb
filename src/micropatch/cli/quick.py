"""The `micropatch` entry point: the commonest commands through a running agent,
without loading the CLI framework.

`micropatch apply|update FILE --pid N…` and `micropatch remove ID --pid N…`
(`--pid N`, `--pid=N` or `-p N`, repeatable, nothing else) are sent straight to
the agent when one answers on its socket: what the command costs is then the
interpreter's start-up and one round-trip, not typer, click and rich (~200 ms,
more than the operation itself). Any other form — another option, --help, no
agent, MICROPATCH_NO_AGENT=1 — runs the full CLI (cli/main.py), which does the
same thing more slowly, or directly without an agent.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not `from typing import`: typing alone costs more than the request
if TYPE_CHECKING:
    from typing import Any

VERBS = ("apply", "update", "remove")
PID_OPTIONS = ("--pid", "-p")


def parse(argv: list[str]) -> tuple[str, str, list[int]] | None:
    """(verb, FILE or ID, pids) for a command of the quick form, else None."""
    if len(argv) < 3 or argv[0] not in VERBS:
        return None
    subject: str | None = None
    pids: list[int] = []
    words = iter(argv[1:])
    for word in words:
        if word in PID_OPTIONS:
            value = next(words, None)
        elif word.startswith("--pid="):
            value = word.removeprefix("--pid=")
        elif word.startswith("-") or subject is not None:
            return None  # an option of the full CLI, or a second argument: its own message
        else:
            subject = word
            continue
        if value is None or not value.isdigit():
            return None
        pids.append(int(value))
    if subject is None or not pids:
        return None
    if argv[0] != "remove" and _python_artifact(subject):
        return None  # CPython patches do not go through the agent yet: the full CLI
    return argv[0], subject, pids


def _python_artifact(path: str) -> bool:
    """A CPython artifact or source (the agent does not carry them yet), by a cheap look."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return False
    return b'"runtime": "cpython"' in data or b'"runtime":"cpython"' in data or (
        b"runtime" in data and b"cpython" in data and not data.lstrip().startswith(b"{")
    )


def run(verb: str, subject: str, pids: list[int]) -> int | None:
    """The exit status, or None if no agent answers (then the full CLI runs)."""
    from micropatch.agent.client import artifact_arguments, running
    from micropatch.cli.answers import describe, plain
    from micropatch.errors import MicropatchError

    client = running()
    if client is None:
        return None
    arguments: dict[str, Any] = {
        "pids": pids, "filters": None, "retries": None, "stop_timeout": None,
        "lock_timeout": None,
    }  # fmt: skip
    try:
        if verb == "remove":
            arguments["patch_id"] = subject
        else:
            arguments.update(artifact_arguments(subject))
        answer = client.call(verb, **arguments)
    except MicropatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = describe(verb, answer, fleet=False)
    for line in report.lines:
        print(plain(line), file=sys.stderr if line.to_stderr else sys.stdout)
    return 1 if report.failed else 0


def main() -> None:
    command = None if os.environ.get("MICROPATCH_NO_AGENT") else parse(sys.argv[1:])
    if command is not None:
        status = run(*command)
        if status is not None:
            sys.exit(status)
    from micropatch.cli.main import app

    app()
