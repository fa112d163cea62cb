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


def test_the_scans_find_a_process_by_its_maps_and_never_this_one() -> None:
    """`pids_whose_maps` and `pids_mentioning` (the scans of `status`, `--all` and the
    CPython runtime) on real processes: a child mapping a file of its own is found by
    both, this process by neither."""
    import os
    import shutil
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    from micropatch.process.maps import pids_mentioning, pids_whose_maps

    with tempfile.TemporaryDirectory() as directory:
        sleeper = os.path.join(directory, "micropatch-scan-sleeper")
        shutil.copy(shutil.which("sleep") or "/bin/sleep", sleeper)
        child = subprocess.Popen([sleeper, "30"])
        try:
            # Until the copy is mapped (its /proc/PID/exe changes before the loader
            # maps it): a bounded wait on what the scans read.
            deadline = time.monotonic() + 10
            while sleeper not in Path(f"/proc/{child.pid}/maps").read_text():
                assert time.monotonic() < deadline, "the child did not exec the copy"
                time.sleep(0.01)
            named = pids_whose_maps(lambda maps: any(m.path == sleeper for m in maps))
            assert named == [child.pid]
            assert pids_mentioning(sleeper) == [child.pid]
            assert os.getpid() not in pids_whose_maps(lambda maps: True)
        finally:
            child.kill()
            child.wait()
        assert child.pid not in pids_mentioning(sleeper)
