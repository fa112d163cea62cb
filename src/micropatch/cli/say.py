"""The lines the process commands print: plain text, coloured on a terminal.

No markup language: a message is printed exactly as it is, brackets and all
(`[rsp+0x10]`, `[rip+0x2f]`), and printing costs no import. Colour only on a
terminal, and never with NO_COLOR set or TERM=dumb (https://no-color.org).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

_CODES = {"green": "32", "red": "31", "yellow": "33", "dim": "2", "bold red": "1;31",
          "bold yellow": "1;33"}  # fmt: skip


def coloured(stream: TextIO) -> bool:
    """Whether lines to `stream` get colours."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _paint(text: str, style: str, stream: TextIO) -> str:
    return f"\x1b[{_CODES[style]}m{text}\x1b[0m" if text and coloured(stream) else text


def _emit(mark: str, style: str, text: str, stream: TextIO, *, whole: bool = False) -> None:
    if whole:
        print(_paint(f"{mark}{text}", style, stream), file=stream, flush=True)
    else:
        print(f"{_paint(mark, style, stream)}{text}", file=stream, flush=True)


def ok(text: str) -> None:
    _emit("✓ ", "green", text, sys.stdout)


def plain(text: str) -> None:
    print(text, flush=True)


def failed(text: str) -> None:
    _emit("✗ ", "red", text, sys.stderr)


def skipped(text: str) -> None:
    _emit("· ", "dim", text, sys.stderr, whole=True)


def waiting(text: str) -> None:
    _emit("… ", "yellow", text, sys.stderr)


def warning(text: str) -> None:
    _emit("warning: ", "bold yellow", text, sys.stderr)


def error(text: str) -> None:
    _emit("error: ", "bold red", text, sys.stderr)


def fail(text: str, status: int = 1) -> SystemExit:
    """Print an error; raise the result to exit with `status`."""
    error(text)
    return SystemExit(status)
