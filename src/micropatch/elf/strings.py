"""C strings in a module's read-only data, as code refers to them."""

from __future__ import annotations

from micropatch.elf.image import ElfImage

_PRINTABLE = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}


def c_string_at(
    image: ElfImage, offset: int, *, min_length: int = 2, max_length: int = 512
) -> str | None:
    """The NUL-terminated text at a module offset, or None if it does not look
    like one: shorter than `min_length`, not printable ASCII or UTF-8, or no NUL
    within `max_length` bytes (then the first `max_length` bytes and an ellipsis)."""
    raw = image.read_upto(offset, max_length + 1)
    end = raw.find(b"\0")
    text = raw if end < 0 else raw[:end]
    if len(text) < min_length:
        return None
    if not all(byte in _PRINTABLE or byte >= 0x80 for byte in text):
        return None
    try:
        decoded = text.decode()
    except UnicodeDecodeError:
        return None
    if end < 0:
        return decoded[:max_length] + "…" if len(raw) > max_length else None
    return decoded
