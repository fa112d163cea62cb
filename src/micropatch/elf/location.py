"""The location syntax shared by patch sources and ELF lookups.

A location names a module offset: `symbol`, `symbol+0x1a`, `symbol+26`, or a
bare number `0x1234`. It is parsed here, once, so that a patch that validates
can always be resolved against a module with the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from micropatch.errors import PatchFormatError

# No leading zeros: C and keystone read 010 as octal, so refuse to guess.
_NUMBER = r"0[xX][0-9a-fA-F]+|0|[1-9][0-9]*"
# C identifiers, C++ mangled names, versioned names (memcpy@@GLIBC_2.14) and
# compiler-made local names (foo.cold, foo.part.0).
_SYMBOL = r"[A-Za-z_.$][A-Za-z0-9_.$@]*"
# Another module's symbol: `libc.so.6!abort`, resolved in each process at apply time.
_MODULE = r"[A-Za-z0-9_.+-]+"
_LOCATION = re.compile(
    rf"\s*(?:(?P<number>{_NUMBER})|(?:(?P<module>{_MODULE})!)?(?P<symbol>{_SYMBOL})"
    rf"(?:\s*\+\s*(?P<addend>{_NUMBER}))?)\s*"
)

SYNTAX_HELP = (
    "expected 'symbol', 'symbol+0xN', '0xN' (a module offset) or 'module!symbol' "
    "(another module's symbol, e.g. 'libc.so.6!abort')"
)


@dataclass(frozen=True)
class Location:
    """A symbol plus an addend, or (symbol None) a plain module offset."""

    symbol: str | None
    addend: int
    module: str | None = None  # another module, by file name; None: the patch's own

    def __str__(self) -> str:
        if self.symbol is None:
            return hex(self.addend)
        name = f"{self.module}!{self.symbol}" if self.module else self.symbol
        return f"{name}+{self.addend:#x}" if self.addend else name


def parse_location(text: str) -> Location:
    """Parse a location; PatchFormatError if it is not one."""
    match = _LOCATION.fullmatch(text)
    if match is None:
        raise PatchFormatError(f"{text!r} is not a location: {SYNTAX_HELP}")
    if match["number"] is not None:
        return Location(symbol=None, addend=int(match["number"], 0))
    addend = match["addend"]
    return Location(
        symbol=match["symbol"], addend=int(addend, 0) if addend else 0, module=match["module"]
    )
