"""A command's arguments and options, declared once.

The process commands (apply, remove, update, status) are declared here as
data: `entry.py` parses a command line against the declaration with `parse`,
in a few microseconds and without the CLI framework, and `typed.py` builds the
typer command of the same declaration for `--help`, for the mistakes `parse`
does not explain, and for `micropatch.cli.main.app`. `parse` accepts a subset
of what click accepts, with the same meaning (a test compares the two on many
command lines); on anything else it returns None and the typer command, which
understands everything, decides.

Standard library only, and not even `typing` or `dataclasses`: this module is on
the path of every process command.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Values = dict[str, Any]

KINDS = ("flag", "int", "float", "str", "path")  # path: a str, shown as PATH in --help


class Option:
    """`--name VALUE` (or a flag); `many`: repeatable, its values a list."""

    __slots__ = ("flags", "help", "kind", "many", "metavar", "minimum", "name")

    def __init__(
        self,
        name: str,
        flags: tuple[str, ...],
        help: str,
        *,
        kind: str = "str",
        many: bool = False,
        minimum: float | None = None,
        metavar: str | None = None,
    ) -> None:
        assert kind in KINDS and not (many and kind == "flag")
        self.name = name  # the key in the values
        self.flags = flags
        self.help = help
        self.kind = kind
        self.many = many
        self.minimum = minimum
        self.metavar = metavar

    @property
    def default(self) -> object:
        return False if self.kind == "flag" else [] if self.many else None


class Argument:
    """A required positional argument."""

    __slots__ = ("help", "kind", "metavar", "name")

    def __init__(self, name: str, help: str, *, kind: str = "str", metavar: str) -> None:
        self.name = name
        self.help = help
        self.kind = kind
        self.metavar = metavar


class Command:
    """A command: its name, help, arguments and options, and what runs it (`run`
    takes the values by name; it exits through SystemExit)."""

    __slots__ = ("arguments", "help", "name", "options", "run")

    def __init__(
        self,
        name: str,
        help: str,
        arguments: tuple[Argument, ...],
        options: tuple[Option, ...],
        run: Callable[[Values], None],
    ) -> None:
        self.name = name
        self.help = help
        self.arguments = arguments
        self.options = options
        self.run = run

    def defaults(self) -> Values:
        return {o.name: o.default for o in self.options}


def parse(command: Command, argv: list[str]) -> Values | None:
    """The values of a command line as click would read it, or None where this
    parser is not sure (an unknown option, a bad value, a missing argument,
    --help): the typer command then reads it, and says what is wrong."""
    by_flag = {flag: o for o in command.options for flag in o.flags}
    values = command.defaults()
    positional: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--":
            positional += words
            break
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        name, given = word, None
        if word.startswith("--") and "=" in word:
            name, given = word.split("=", 1)
        elif not word.startswith("--") and len(word) > 2:
            name, given = word[:2], word[2:]  # -p12
        option = by_flag.get(name)
        if option is None:
            return None
        if option.kind == "flag":
            if given is not None:
                return None
            values[option.name] = True
            continue
        text = next(words, None) if given is None else given
        if text is None:
            return None
        value = _convert(option, text)
        if value is None:
            return None
        if option.many:
            values[option.name].append(value)
        else:
            values[option.name] = value
    if len(positional) != len(command.arguments):
        return None
    for argument, text in zip(command.arguments, positional, strict=True):
        values[argument.name] = text
    return values


def _convert(option: Option, text: str) -> object:
    if option.kind in ("str", "path"):
        return text
    try:
        number: float = int(text) if option.kind == "int" else float(text)
    except ValueError:
        return None
    if option.minimum is not None and not number >= option.minimum:
        return None  # also NaN
    return number
