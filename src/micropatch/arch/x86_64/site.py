"""Choosing the bytes a patch jump overwrites, and proving that is safe.

A site is the run of whole instructions that the 5-byte jump to the trampoline
replaces. Overwriting them is only safe if nothing else in the function jumps
into, calls back into, or reads the middle of those bytes: after patching they
hold the tail of the jump and int3 padding.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from iced_x86 import Instruction, MemorySizeExt

from micropatch.arch.x86_64.decode import (
    decode,
    format_instruction,
    is_call,
    is_invalid,
    near_branch_target,
)
from micropatch.errors import BranchIntoSite, NotInstructionBoundary, SiteError


@dataclass(frozen=True)
class Site:
    """The displaced instructions at one patched address, and their original bytes."""

    address: int
    instructions: tuple[Instruction, ...]
    original: bytes

    @property
    def length(self) -> int:
        """Number of bytes the site jump overwrites."""
        return len(self.original)

    @property
    def end(self) -> int:
        """Address of the first byte after the site, where execution resumes."""
        return self.address + self.length

    @property
    def starts(self) -> tuple[int, ...]:
        """Where each displaced instruction starts."""
        return tuple(instruction.ip for instruction in self.instructions)


def plan_site(
    function_code: bytes, function_address: int, site_address: int, *, min_length: int = 5
) -> Site:
    """Plan a site at ``site_address`` and check it against its whole function.

    The function (``function_code`` loaded at ``function_address``) is decoded
    by linear sweep; the site takes whole instructions from ``site_address``
    until it is at least ``min_length`` bytes long. Raises
    :class:`NotInstructionBoundary`, :class:`BranchIntoSite` or
    :class:`SiteError` saying why the site is unsafe and what to choose instead.
    """
    function_end = function_address + len(function_code)
    where = f"function {function_address:#x}-{function_end:#x}"
    if not function_address <= site_address < function_end:
        raise SiteError(f"site {site_address:#x} is outside the {where} given for it")
    instructions = decode(function_code, function_address)
    for instruction in instructions:
        if is_invalid(instruction):
            raise SiteError(
                f"cannot check site {site_address:#x}: the {where} does not decode at "
                f"{instruction.ip:#x} (data in code, or wrong function bounds?); "
                "if you know nothing branches into the site, mark it unchecked"
            )
    first = _index_of(instructions, site_address, where)
    site = _take(
        instructions[first:],
        function_code[site_address - function_address :],
        site_address,
        min_length,
        f"the end of the {where}",
    )
    _check_references(instructions, site, where)
    return site


def site_unchecked(code: bytes, address: int, *, min_length: int = 5) -> Site:
    """Plan a site from ``code`` starting at it, without the function-wide checks.

    This is the author's override for code whose function bounds are unknown:
    nothing here can tell whether another branch targets the middle of the site.
    """
    return _take(
        decode(code, address),
        code,
        address,
        min_length,
        f"the end of the {len(code)} bytes given",
    )


def _index_of(instructions: Sequence[Instruction], address: int, where: str) -> int:
    """Index of the instruction starting at ``address``, which must be a boundary."""
    starts = [instruction.ip for instruction in instructions]
    index = bisect.bisect_right(starts, address) - 1
    containing = instructions[index]
    if containing.ip != address:
        raise NotInstructionBoundary(
            f"site {address:#x} is inside the instruction at {containing.ip:#x} "
            f"({format_instruction(containing)}) in the {where}; "
            f"nearest boundaries: {containing.ip:#x}, {containing.next_ip:#x}"
        )
    return index


def _take(
    instructions: Sequence[Instruction], code: bytes, address: int, min_length: int, limit: str
) -> Site:
    """Take whole instructions from ``instructions``, which decode ``code`` at ``address``."""
    taken: list[Instruction] = []
    length = 0
    for instruction in instructions:
        if length >= min_length:
            break
        if is_invalid(instruction):
            raise SiteError(
                f"site {address:#x} cannot be decoded: invalid or truncated instruction "
                f"at {instruction.ip:#x}"
            )
        taken.append(instruction)
        length += instruction.len
    if length < min_length:
        raise SiteError(
            f"site {address:#x} needs {min_length} bytes of whole instructions but only "
            f"{length} remain before {limit}; choose an earlier site"
        )
    for instruction in taken[:-1]:
        if is_call(instruction):
            raise SiteError(
                f"site {address:#x}-{address + length:#x} displaces the call at "
                f"{instruction.ip:#x} ({format_instruction(instruction)}) before its last "
                f"instruction: the call would return to {instruction.next_ip:#x}, inside "
                "the overwritten bytes; choose a site that ends with the call or starts after it"
            )
    return Site(address=address, instructions=tuple(taken), original=code[:length])


def _check_references(instructions: Sequence[Instruction], site: Site, where: str) -> None:
    """Refuse if any instruction of the function reaches the middle of the site."""
    span = f"site {site.address:#x}-{site.end:#x}"
    for instruction in instructions:
        text = f"{format_instruction(instruction)} at {instruction.ip:#x}"
        target = near_branch_target(instruction)
        if target is not None and site.address < target < site.end:
            raise BranchIntoSite(
                f"{text} in the {where} branches to {target:#x}, inside {span}: the patch "
                f"jump would overwrite its target; choose a site that starts at {target:#x} "
                "or ends before it"
            )
        if instruction.is_ip_rel_memory_operand and _touches_site(instruction, site):
            raise BranchIntoSite(
                f"{text} in the {where} refers to {instruction.ip_rel_memory_address:#x}, "
                f"inside {span} (a jump table or a read of code): after patching it would "
                "see the patch jump; choose a site that does not cover that address"
            )


def _touches_site(instruction: Instruction, site: Site) -> bool:
    """True if the RIP-relative operand of ``instruction`` points into the site.

    An address computation (lea, no access) may name the site's first byte, like
    a branch may; an access of any site byte would see the patched bytes.
    """
    target = instruction.ip_rel_memory_address
    size = MemorySizeExt.size(instruction.memory_size)
    if size == 0:
        return site.address < target < site.end
    return target < site.end and target + size > site.address
