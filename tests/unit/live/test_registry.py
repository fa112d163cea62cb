import pytest

from micropatch.errors import CaveError
from micropatch.live.cave import allocate
from micropatch.live.registry import REGISTRY_SIZE, AppliedPatch, AppliedSite, Registry


def sample() -> Registry:
    site = AppliedSite(
        0, 0x5555_0000_1234, b"\x55\x48\x89\xe5\x90", b"\xe9\x00\x00\x00\x00", 0x5555_1000_4000, 40
    )
    return Registry(
        "/usr/lib/libfoo.so",
        0x5555_0000_0000,
        "ab12",
        "cd" * 32,
        65536,
        [AppliedPatch("fix-1", 2, "a fix", 1700000000.5, [site])],
    )


def test_round_trip() -> None:
    reg = sample()
    blob = reg.encode()
    assert Registry.decode(blob) == reg


def test_not_a_registry() -> None:
    assert Registry.decode(b"\x00" * 64) is None
    assert Registry.decode(b"") is None


def test_long_registry_reads_more() -> None:
    blob = sample().encode()
    assert Registry.decode(blob[:32], lambda n: blob[:n]) == sample()


def test_corrupt_json() -> None:
    blob = bytearray(sample().encode())
    blob[20] ^= 0xFF
    with pytest.raises(CaveError, match="corrupt"):
        Registry.decode(bytes(blob))


def test_too_many_patches() -> None:
    reg = sample()
    reg.patches *= 200
    with pytest.raises(CaveError, match="too many patches"):
        reg.encode()


def test_allocate_first_fit() -> None:
    base = 0x10000
    first = base + REGISTRY_SIZE
    assert allocate([], base, 65536, 100) == first
    assert allocate([(first, first + 100)], base, 65536, 50) == first + 112  # 16-aligned
    assert allocate([(first + 64, first + 100)], base, 65536, 64) == first  # a hole first
    with pytest.raises(CaveError, match="full"):
        allocate([], base, REGISTRY_SIZE + 32, 64)
