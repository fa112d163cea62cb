"""What every command shares: option types, the two consoles, errors and warnings.

Kept light: a command imports the engine, the assembler or the crypto only
when it runs, so `micropatch status` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from micropatch.trust.paths import DEFAULT_TRUST_DIR, TRUST_DIR_VARIABLE

if TYPE_CHECKING:
    from rich.console import Console


class _LazyConsole:
    """A rich Console made on first use: importing rich.console costs ~40 ms,
    which a command that prints nothing through rich (`status` piped, or with
    nothing applied) need not pay."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)

    # `with console:` looks these up on the type, not through __getattr__.
    def __enter__(self) -> Console:
        return self.get().__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.get().__exit__(exc_type, exc_value, traceback)


# soft_wrap: never hard-wrap messages at the terminal width, and never when piped.
_out = _LazyConsole(soft_wrap=True, highlight=False)
_err = _LazyConsole(stderr=True, soft_wrap=True, highlight=False)
out = cast("Console", _out)
err = cast("Console", _err)


def stdout_console() -> Console:
    """The real Console behind `out`, for rich objects that take a console."""
    return _out.get()


def stderr_console() -> Console:
    """The real Console behind `err`, for rich objects that take a console."""
    return _err.get()


TrustOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--trust",
        help=(
            "Trusted public key file (.pub) or directory of them (repeatable). "
            f"Default: the *.pub files in ${TRUST_DIR_VARIABLE} ({DEFAULT_TRUST_DIR})."
        ),
    ),
]
AllowUnsignedOption = Annotated[
    bool,
    typer.Option(
        "--allow-unsigned",
        help="Development only: accept a TOML source, or an artifact without signatures.",
    ),
]
PidOption = Annotated[
    list[int] | None, typer.Option("--pid", "-p", help="Target process id (repeatable).")
]
AllOption = Annotated[bool, typer.Option("--all", help="Every process this concerns.")]
RetriesOption = Annotated[
    int | None,
    typer.Option(
        help="How often to retry when a thread is executing code being changed, or does not "
        "stop within --stop-timeout (default 20)."
    ),
]

StopTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--stop-timeout",
        min=0.001,
        metavar="SECONDS",
        help="How long every thread may take to stop before the attempt is abandoned "
        "(untouched) and retried within --retries (default 2).",
    ),
]


def fail(message: str) -> typer.Exit:
    """Print an error; raise the result to exit with status 1."""
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/] {message}")
LockTimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--lock-timeout",
        min=0,
        help="Seconds to wait for another micropatch operation on the same process "
        "(default 30).",
    ),
]
ExeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--exe", help="With --all: only processes whose executable path matches this glob."
    ),
]
UserOption = Annotated[
    list[str] | None,
    typer.Option("--user", help="With --all: only processes of this user (name or uid)."),
]
UnitOption = Annotated[
    list[str] | None,
    typer.Option(
        "--unit",
        help="With --all: only processes in this systemd unit (glob; `nginx` = nginx.service).",
    ),
]
CgroupOption = Annotated[
    list[str] | None,
    typer.Option("--cgroup", help="With --all: only processes whose cgroup path matches."),
]
DryRunOption = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="With --all: list the processes it would touch, and touch none."
    ),
]
