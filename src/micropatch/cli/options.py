"""What every command shares: option types, the two consoles, errors and warnings.

Kept light: a command imports the engine, the assembler or the crypto only
when it runs, so `micropatch status` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from micropatch.cli import scope

if TYPE_CHECKING:
    from rich.console import Console

    from micropatch.trust.keys import PublicKey


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


def short(text: str, keep: int = 16) -> str:
    """A hash or key id as printed: its first `keep` characters and `…` on a terminal,
    whole when the output goes to a program (piped, redirected), which matches it."""
    return text[:keep] + "…" if _out.get().is_terminal and len(text) > keep else text


def key_text(public: PublicKey) -> str:
    """A key as printed: its name and id (`short`)."""
    return f"key {public.name!r} ({short(public.keyid)})"


def table_console() -> Console:
    """The console a table is printed on: the terminal's; when the output is not a
    terminal, one wide enough that no cell is cut with `…` or wrapped mid-token."""
    if _out.get().is_terminal:
        return _out.get()
    from rich.console import Console

    return Console(width=1000, soft_wrap=True, highlight=False)


# The options other commands share with the process commands: one help text (scope.py).
TrustOption = Annotated[list[Path] | None, typer.Option(*scope.TRUST.flags, help=scope.TRUST.help)]
AllowUnsignedOption = Annotated[
    bool, typer.Option(*scope.ALLOW_UNSIGNED.flags, help=scope.ALLOW_UNSIGNED.help)
]
PidOption = Annotated[list[int] | None, typer.Option(*scope.PID.flags, help=scope.PID.help)]
AllOption = Annotated[bool, typer.Option(*scope.ALL.flags, help=scope.ALL.help)]


def fail(message: str) -> typer.Exit:
    """Print an error (as it is: no markup in it is interpreted); raise the result to
    exit with status 1."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(1)


def warn(message: str) -> None:
    """Print a warning, as it is."""
    err.print(f"[bold yellow]warning:[/] {escape(message)}")


def escape(text: object) -> str:
    """`text` for a rich console: every `[` that could open markup escaped, so that
    `[rsp+0x10]` is printed, not eaten."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))
