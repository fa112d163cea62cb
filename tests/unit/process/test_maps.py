from micropatch.process.maps import mapping_at, parse_maps

SAMPLE = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234                       /usr/bin/vuln
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234                       /usr/bin/vuln
7f0000000000-7f0000010000 r-xp 00000000 00:01 77                         /memfd:micropatch (deleted)
7f0000100000-7f0000121000 rw-p 00000000 00:00 0
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_parse_fields() -> None:
    maps = parse_maps(SAMPLE)
    assert len(maps) == 5
    exe = maps[1]
    assert (exe.start, exe.end, exe.offset, exe.inode) == (
        0x55D0C0A01000,
        0x55D0C0A02000,
        0x1000,
        1234,
    )
    assert exe.executable and exe.readable and exe.name == "vuln" and not exe.deleted


def test_deleted_and_anonymous() -> None:
    maps = parse_maps(SAMPLE)
    assert maps[2].deleted and maps[2].file_path == "/memfd:micropatch"
    assert maps[3].path == "" and maps[3].inode == 0
    assert maps[4].path == "[stack]"


def test_mapping_at() -> None:
    maps = parse_maps(SAMPLE)
    assert mapping_at(maps, 0x55D0C0A01800) is maps[1]
    assert mapping_at(maps, 0x10) is None
