"""agent_index: the module index's first walk of 500,000 files, and its cost afterwards.

The agent's index (agent/modindex.py, kept by agent/indexer.py) finds every copy
of a patched module build by identity. This runs the real Indexer (its thread,
its fanotify filesystem marks) in a child process inside a sandbox
(tests/targets/isolation.py: own PID + mount namespaces, a private tmpfs), so
nothing of the host's filesystems is marked or walked. The tree on the tmpfs:

- FILES files (500,000) in directories of 100 (5,000 directories, 3 levels);
- one in ten an ELF file of another build (the first 4 KiB of one of the
  host's shared libraries: the same cost to the prefilter as a whole module
  whose build-id no patch names), the rest small text files (a few bytes to
  a few hundred);
- COPIES copies of the patched library libnpvuln.so under other names in
  random directories (what the index must find).

Measured, in the child: the first walk's wall time and the index's counts
(files, modules, hashed, copies found), RSS before the walk and its peak
(VmHWM) after; then steady state: the child's CPU over IDLE seconds with
nothing happening, then over CHURN seconds while the parent writes RATE
files/s (temp name, then renamed into place, as a package manager does; one in
ten an ELF) and deletes as many, one of them a new copy of the library
(it must be found from its events, with no walk).

The tmpfs holds everything in memory: this measures the index's own cost (CPU,
system calls), not a disk's. On a disk the first walk also reads one block per
file not in the page cache (the first page of each regular file) and its
directories; the index reads nothing else of a file that is not a candidate.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

NAME = "agent_index"
FILES, QUICK_FILES = 500_000, 20_000
PER_DIRECTORY = 100
ELF_EVERY = 10
COPIES = 8
IDLE, QUICK_IDLE = 30.0, 5.0
CHURN, QUICK_CHURN = 30.0, 5.0
RATE = 200  # files/s written then renamed into place (and as many deleted)
LIBRARIES = Path("/usr/lib/x86_64-linux-gnu")


# --- the child: the Indexer, inside the sandbox ---------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(argv: list[str]) -> int:
    """`agent_index.py child ROOT LIBRARY`: index ROOT for LIBRARY's build; JSON lines
    on stdout; `idle` / `churn` / `done` / `stats` lines on stdin mark the phases."""
    from micropatch.agent.indexer import Indexer
    from micropatch.agent.modindex import ModuleIndex
    from micropatch.elf.identity import identify
    from micropatch.patch.model import Target

    root, library = argv
    with open(library, "rb") as f:
        identity = identify(f)
    target = Target(module=Path(library).name, build_id=identity.build_id)
    rss_before = _status_kb("VmRSS")
    indexer = Indexer(ModuleIndex(), filesystems=[root])
    indexer.retarget([target])
    started, cpu = time.monotonic(), _cpu()
    indexer.start()
    if not indexer.ready.wait(3600):
        print(json.dumps({"error": "the first walk did not end"}), flush=True)
        return 1
    walk = {
        "seconds": time.monotonic() - started,
        "cpu_seconds": _cpu() - cpu,
        "rss_before_kb": rss_before,
        "rss_after_kb": _status_kb("VmRSS"),
        "rss_peak_kb": _status_kb("VmHWM"),
        "status": indexer.status(),
    }
    print(json.dumps({"walk": walk}), flush=True)
    mark = (time.monotonic(), _cpu(), indexer.events)
    for line in sys.stdin:
        now = (time.monotonic(), _cpu(), indexer.events)
        phase = {
            "seconds": now[0] - mark[0], "cpu_seconds": now[1] - mark[1],
            "events": now[2] - mark[2], "copies": len(indexer.index.copies()),
            "walks": indexer.walks, "overflows": indexer.overflows,
            "rss_kb": _status_kb("VmRSS"),
        }  # fmt: skip
        print(json.dumps({line.strip(): phase}), flush=True)
        mark = (time.monotonic(), _cpu(), indexer.events)
    indexer.stop()
    return 0


# --- the parent ------------------------------------------------------------------------


def _elf_heads() -> list[bytes]:
    heads = []
    for path in sorted(LIBRARIES.glob("lib*.so.*"))[:64]:
        try:
            data = path.read_bytes()[:4096]
        except OSError:
            continue
        if data[:4] == b"\x7fELF":
            heads.append(data)
    return heads or [Path("/bin/true").read_bytes()[:4096]]


def _generate(top: Path, files: int, library: bytes, rng: random.Random) -> dict[str, Any]:
    """The tree under `top` (a path the parent reaches): see the module doc."""
    heads = _elf_heads()
    started = time.monotonic()
    directories = max(1, files // PER_DIRECTORY)
    copies = set(rng.sample(range(files), COPIES))
    made = 0
    for d in range(directories):
        directory = top / f"pkg{d // 100:03d}" / f"mod{(d // 10) % 10}" / f"d{d}"
        directory.mkdir(parents=True)
        for i in range(d * PER_DIRECTORY, min(files, (d + 1) * PER_DIRECTORY)):
            if i in copies:
                data, name = library, f"libnpvuln-{i:08x}.so"
            elif i % ELF_EVERY == 0:
                data, name = heads[i % len(heads)], f"lib{i}.so"
            else:
                data, name = b"x = %d\n" % i * rng.randint(1, 40), f"f{i}.py"
            (directory / name).write_bytes(data)
            made += 1
    return {"files": made, "directories": directories, "copies": COPIES,
            "elf_heads": len(heads), "seconds": time.monotonic() - started}  # fmt: skip


def _churn(top: Path, seconds: float, library: bytes, rng: random.Random) -> dict[str, int]:
    heads = _elf_heads()
    place = top / "churn"
    place.mkdir()
    period = 1.0 / RATE
    started = time.monotonic()
    written = deleted = 0
    names: list[str] = []
    copy_at = int(RATE * seconds / 2)
    while time.monotonic() - started < seconds:
        due = started + written * period
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        if written == copy_at:
            data, name = library, "libnpvuln-new.so"  # kept: it must be found
        elif written % ELF_EVERY == 0:
            data, name = heads[written % len(heads)], f"lib{written}.so"
            names.append(name)
        else:
            data, name = b"y = %d\n" % written * rng.randint(1, 40), f"g{written}.py"
            names.append(name)
        (place / f".tmp{written}").write_bytes(data)
        os.rename(place / f".tmp{written}", place / name)
        written += 1
        if len(names) > 50:
            (place / names.pop(0)).unlink()
            deleted += 1
    return {"written": written, "deleted": deleted}


def _read(proc: subprocess.Popen[str], key: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the indexer child ended before {key!r}")
    data = json.loads(line)
    if key not in data:
        raise RuntimeError(f"the indexer child said {data}")
    return dict(data[key])


def measure(out: Path, files: int, idle: float, churn: float) -> dict[str, Any]:
    from targets.isolation import Sandbox
    from targets.newproc import build

    paths = build(out / "build")
    library = paths["libnpvuln.so"].read_bytes()
    rng = random.Random(15)
    result: dict[str, Any] = {}
    size = f"{max(1, files * 5 // 1_000_000 + 1)}g"  # a page per small file, and slack
    with Sandbox(out / "host", size=size) as box:
        lib = box.install({"lib": paths["libnpvuln.so"]}, box.root / "patched")["lib"]
        top = box.host_path(box.root / "tree")
        result["tree"] = _generate(top, files, library, rng)
        proc = subprocess.Popen(
            [*box.enter(), sys.executable, __file__, "child", str(box.root), str(lib)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=ROOT,
        )  # fmt: skip
        try:
            assert proc.stdin is not None
            result["walk"] = _read(proc, "walk")
            time.sleep(idle)
            proc.stdin.write("idle\n")
            result["idle"] = _read(proc, "idle")
            result["churn_load"] = _churn(top, churn, library, rng)
            time.sleep(1.0)  # the last events read
            proc.stdin.write("churn\n")
            result["churn"] = _read(proc, "churn")
            proc.stdin.close()
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return result


def _mib(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def markdown(r: dict[str, Any] | None, error: str | None) -> str:
    if r is None:
        return f"**Not measured**: {error}"
    w, tree = r["walk"], r["tree"]
    last = w["status"]["last_walk"]
    idle, churn, load = r["idle"], r["churn"], r["churn_load"]
    found = w["status"]["copies"]
    return "\n".join([
        f"Tree (tmpfs, private to the sandbox): {tree['files']:,} files in "
        f"{tree['directories']:,} directories, one in {ELF_EVERY} an ELF file of another "
        f"build, {tree['copies']} renamed copies of the patched library (+1 outside the "
        f"tree, where the patch's file was installed); generated in {tree['seconds']:.0f} s.",
        "",
        "| first walk | result |",
        "|---|---:|",
        f"| wall time | {w['seconds']:.1f} s |",
        f"| CPU time (the child's) | {w['cpu_seconds']:.1f} s |",
        f"| files / directories seen | {last['files']:,} / {last['directories']:,} |",
        f"| loadable x86-64 modules (ELF heads of other builds are read, then dropped) "
        f"/ hashed (candidates) | "
        f"{last['modules']:,} / {last['hashed']:,} |",
        f"| copies found (expected {tree['copies'] + 1}) | {found} |",
        f"| RSS before the walk / after / peak | {_mib(w['rss_before_kb'])} / "
        f"{_mib(w['rss_after_kb'])} / {_mib(w['rss_peak_kb'])} MiB |",
        "",
        "| steady state | seconds | CPU | events read | copies | walks |",
        "|---|---:|---:|---:|---:|---:|",
        f"| idle | {idle['seconds']:.0f} | {idle['cpu_seconds'] / idle['seconds'] * 100:.2f}% "
        f"| {idle['events']:,} | {idle['copies']} | {idle['walks']} |",
        f"| churn: {RATE} files/s written + renamed into place ({load['written']:,}), "
        f"{load['deleted']:,} deleted, one new copy | {churn['seconds']:.0f} "
        f"| {churn['cpu_seconds'] / churn['seconds'] * 100:.2f}% | {churn['events']:,} "
        f"| {churn['copies']} | {churn['walks']} |",
        "",
        "CPU is the indexer child's (its thread and the interpreter's), as a share of one "
        "CPU. `walks` stays 1: the new copy was found from its rename event, not a walk.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from benchmarks import report

    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument("--files", type=int, default=None, help=f"default {FILES:,}")
    args = report.parse(parser, argv)
    files = args.files or (QUICK_FILES if args.quick else FILES)
    idle = QUICK_IDLE if args.quick else IDLE
    churn = QUICK_CHURN if args.quick else CHURN
    result = error = None
    with tempfile.TemporaryDirectory(prefix="micropatch-bench-") as tmp:
        try:
            result = measure(Path(tmp), files, idle, churn)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    data = {"targets": "tests/targets/vuln_fn.c, np_ctor.c", "error": error, "result": result}
    _, md_path = report.write(
        NAME, args, argv, "agent_index: the module index on 500,000 files", data,
        markdown(result, error),
    )  # fmt: skip
    print(md_path.read_text())
    return 0 if error is None else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
