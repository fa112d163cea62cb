"""`micropatch inspect`: the command; the work is in `cli.inspection`, imported
when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def inspect(
    artifact_file: Annotated[Path, typer.Argument(help="Artifact (.mpatch) or patch source.")],
    module: Annotated[
        Path | None, typer.Option("--module", "-m", help="Show it against this module file.")
    ] = None,
    pid: Annotated[
        int | None, typer.Option("--pid", "-p", help="Show it in this running process.")
    ] = None,
) -> None:
    """Show each site: original instructions, the jump that replaces them, the trampoline."""
    from micropatch.cli.inspection import show

    show(artifact_file, module, pid)
