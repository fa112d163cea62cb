"""ELF modules as files: identity, symbols, function bounds, bytes by module offset."""

from micropatch.elf.identity import ModuleIdentity, build_id_from_bytes, identify
from micropatch.elf.image import ElfImage, LoadSegment, Symbol
from micropatch.elf.location import Location, parse_location

__all__ = [
    "ElfImage",
    "LoadSegment",
    "Location",
    "ModuleIdentity",
    "Symbol",
    "build_id_from_bytes",
    "identify",
    "parse_location",
]
