"""What `micropatch agent install` and `micropatch server install` share: where units
go, the command a unit runs, whether systemd runs here, and quoting for unit files
(which are written whole with micropatch.files.write_atomic).

Standard library only: the CLI's install verbs load nothing else for it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

UNIT_DIR = "/etc/systemd/system"


@dataclass
class Installed:
    """What install wrote (or found already there, which it never overwrites)."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def entry_point() -> str:
    """The absolute path of the `micropatch` command running now."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "micropatch" and argv0.exists():
        return str(argv0.resolve())
    found = shutil.which("micropatch") or str(Path(sys.executable).with_name("micropatch"))
    return str(Path(found).resolve())


def running() -> bool:
    """Whether systemd is this machine's init (so `systemctl` may be called)."""
    return Path("/run/systemd/system").is_dir()


def systemctl(*args: str) -> None:
    """`systemctl ARGS…`, its failure left to the caller's next step (as a shell would)."""
    subprocess.run(["systemctl", *args], check=False)


def quote(word: str) -> str:
    """One word of a unit file's command line or path list, as systemd reads it back:
    `%` (specifiers) and `$` (variables) doubled, double quotes where needed."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in word):
        raise ValueError(f"{word!r}: a unit file cannot hold control characters")
    escaped = word.replace("%", "%%").replace("$", "$$")
    if escaped and not any(c in escaped for c in " \t\"'\\;"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def join(words: list[str]) -> str:
    return " ".join(map(quote, words))
