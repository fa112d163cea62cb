"""x86-64 facts the rest of micropatch relies on, named once."""

from __future__ import annotations

NAME = "x86_64"
"""As `uname -m` prints it, and as a patch's `[target] arch` names it."""

PAGE_SIZE = 4096
RED_ZONE = 128
"""Bytes below rsp that a System V leaf function may use without moving rsp."""

JUMP_LENGTH = 5
"""`jmp rel32`: the bytes a site jump needs."""

JUMP_REACH = 1 << 31
"""How far a rel32 jump or RIP-relative operand reaches, either way."""

INT3 = b"\xcc"
