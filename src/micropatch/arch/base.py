"""What an architecture provides to the layers above it, and the data it returns.

Everything machine-specific sits behind this seam: decoding, choosing a site,
relocating the displaced instructions, laying out a trampoline, and the
constants (page size, red zone, jump length and reach). The planner, the
artifact builder, the engine, its safety checks and `inspect` take an
`Architecture` and never import a machine's package themselves, so a second
architecture is a new folder under `arch/` and one line in `arch.get`.

An implementation is a module whose attributes match `Architecture`
(`micropatch.arch.x86_64`); `arch.get("x86_64")` returns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class Site(Protocol):
    """The whole instructions a site jump overwrites, as the architecture planned them."""

    @property
    def address(self) -> int: ...
    @property
    def original(self) -> bytes: ...
    @property
    def length(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def starts(self) -> tuple[int, ...]:
        """Where each displaced instruction starts."""
        ...


@dataclass(frozen=True)
class TrampolineLayout:
    """A trampoline as built at `address`: its code and where each part is.

    `body` is the address range of the patchlet body. `copies` holds where the
    relocated copy of each displaced instruction starts, then where the jump
    back starts; it is empty when the trampoline resumes elsewhere (the
    displaced instructions are skipped). The engine, its safety checks and
    `inspect` read these instead of re-deriving them.
    """

    address: int
    code: bytes
    body: tuple[int, int]
    copies: tuple[int, ...]
    skip_red_zone: bool

    @property
    def size(self) -> int:
        return len(self.code)

    @property
    def end(self) -> int:
        return self.address + len(self.code)

    @property
    def tail(self) -> int:
        """Where the relocated displaced instructions start; 0 if there are none."""
        return self.copies[0] if self.copies else 0

    def part(self, address: int) -> str:
        """Which part of the trampoline `address` is in, for listings."""
        if self.body[0] <= address < self.body[1]:
            return "body"
        if self.copies and self.copies[0] <= address < self.copies[-1]:
            return "displaced"
        if self.copies and address >= self.copies[-1]:
            return "back"
        return "red zone" if self.skip_red_zone else "resume"


@dataclass(frozen=True)
class Listed:
    """One decoded instruction for people: address, bytes, text and what it refers to."""

    address: int
    raw: bytes
    text: str
    references: tuple[int, ...]  # branch targets, RIP-relative and 64-bit immediate addresses


class Architecture(Protocol):
    """The seam: see the module docstring. Addresses are absolute; bytes are code."""

    NAME: str
    PAGE_SIZE: int
    RED_ZONE: int
    JUMP_LENGTH: int
    JUMP_REACH: int

    def plan_site(self, function_code: bytes, function_address: int, site_address: int) -> Site: ...

    def site_unchecked(self, code: bytes, address: int) -> Site: ...

    def build_trampoline(
        self,
        address: int,
        site: Site,
        body_at: Callable[[int], bytes],
        *,
        resume: int | None,
        skip_red_zone: bool,
    ) -> TrampolineLayout: ...

    def site_jump(self, site: Site, trampoline_address: int) -> bytes: ...

    def writes_stack(self, code: bytes, address: int) -> bool: ...

    def instruction_starts(self, code: bytes, address: int) -> list[int]: ...

    def listing(self, code: bytes, address: int) -> Sequence[Listed]: ...
