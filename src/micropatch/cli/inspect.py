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
    """Show each site: original instructions, the jump that replaces them, the trampoline.

    A CPython artifact: each function's original and patched source and bytecode."""
    from micropatch.cli.pyauthoring import is_python

    if is_python(artifact_file):
        _inspect_python(artifact_file, pid)
        return
    from micropatch.cli.inspection import show

    show(artifact_file, module, pid)


def _inspect_python(artifact_file: Path, pid: int | None) -> None:
    from micropatch.cli.options import fail
    from micropatch.cli.pyauthoring import inspect_python
    from micropatch.errors import MicropatchError
    from micropatch.trust.artifact import PythonArtifact, load_any

    try:
        built = load_any(artifact_file)
    except MicropatchError as e:
        raise fail(
            f"{e} (a CPython patch source is inspected once built: micropatch build)"
        ) from None
    assert isinstance(built, PythonArtifact)
    inspect_python(built, pid)
