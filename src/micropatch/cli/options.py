"""What every command shares: option types, the two consoles, errors and warnings.

Kept light: a command imports the engine, the assembler or the crypto only
when it runs, so `micropatch status` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from micropatch.trust.paths import DEFAULT_TRUST_DIR, TRUST_DIR_VARIABLE

# soft_wrap: never hard-wrap messages at the terminal width, and never when piped.
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

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
        help="How often to retry when a thread is executing code being changed (default 20)."
    ),
]


def fail(message: str) -> typer.Exit:
    """Print an error; raise the result to exit with status 1."""
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/] {message}")
