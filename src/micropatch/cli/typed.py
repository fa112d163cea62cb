"""The typer command of a declaration in `spec.py`: the same arguments and options,
the same `run`, with typer's help and error messages."""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer

from micropatch.cli.spec import Command, Option

# A path stays the text given (as `spec.parse` gives it): pathlib would turn "" into "."
# and drop a trailing "/", which says "a directory".
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "path": str}


def add(app: typer.Typer, command: Command) -> None:
    """Add `command` to `app` under its name."""
    parameters = [
        inspect.Parameter(
            a.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[_TYPES[a.kind], typer.Argument(help=a.help, metavar=a.metavar)],
        )
        for a in command.arguments
    ]
    parameters += [
        inspect.Parameter(
            o.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=_annotation(o),
            default=False if o.kind == "flag" else None,
        )
        for o in command.options
    ]

    repeatable = {o.name for o in command.options if o.many}

    def invoke(**values: Any) -> None:
        command.run({
            name: [] if value is None and name in repeatable else value
            for name, value in values.items()
        })  # fmt: skip

    invoke.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    app.command(command.name, help=command.help)(invoke)


def _annotation(option: Option) -> Any:
    settings: dict[str, Any] = {"help": option.help}
    if option.metavar is not None or option.kind == "path":
        settings["metavar"] = option.metavar or "PATH"
    if option.minimum is not None:
        settings["min"] = option.minimum
    if option.kind == "flag":
        return Annotated[bool, typer.Option(*option.flags, **settings)]
    kind = _TYPES[option.kind]
    if option.many:
        return Annotated[list[kind] | None, typer.Option(*option.flags, **settings)]  # type: ignore[valid-type]
    return Annotated[kind | None, typer.Option(*option.flags, **settings)]
