"""diff: wall time and peak memory of `micropatch diff` on real vulnerable/fixed pairs.

Each trial runs `micropatch diff OLD NEW --json` in a child process and takes
its wall-clock time and its maximum resident set size (from wait4). The
pairs are the modules of the real-world patches: lxml 6.0.0 -> 6.0.1
`etree` (5 MB, 3 MB of code, stripped) and Pillow 12.1.0 -> 12.1.1
`_imaging`. The wheels come from PyPI with `pip download`. The issue's
targets are the baseline: under 60 s and 1 GiB on the lxml pair.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.stats import median

NAME = "diff"
TRIALS = 3
QUICK_TRIALS = 1
TARGET_SECONDS = 60.0
TARGET_BYTES = 1 << 30

PAIRS = {
    "lxml 6.0.0 -> 6.0.1 etree": (
        "lxml==6.0.0", "lxml==6.0.1", "lxml/etree.cpython-311-x86_64-linux-gnu.so", (0x2AAE30,),
    ),
    "Pillow 12.1.0 -> 12.1.1 _imaging": (
        "pillow==12.1.0", "pillow==12.1.1", "PIL/_imaging.cpython-311-x86_64-linux-gnu.so",
        (0x1B870, 0x1CD00),
    ),
}  # fmt: skip
# The fixed functions (old offsets, from the patches' patch.toml) whose rank is reported.


def fetch(requirement: str, member: str, directory: Path) -> Path:
    """`member` of the cp311 wheel of `requirement`, downloaded with pip."""
    into = directory / requirement
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.11", "-d", str(into), requirement],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = into.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(member, into / "unpacked"))


def run_once(old: Path, new: Path) -> tuple[float, int, list[dict[str, Any]]]:
    """(seconds, max RSS in bytes, ranked changes) of one `micropatch diff --json`."""
    code = "from micropatch.cli.main import app; app()"
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", code, "diff", str(old), str(new), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stderr is not None
    out = child.stdout.read()
    errors = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"micropatch diff failed ({child.returncode}): {errors.decode()}")
    return elapsed, usage.ru_maxrss * 1024, json.loads(out)


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    args = report.parse(parser, argv)
    trials = QUICK_TRIALS if args.quick else TRIALS
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="micropatch-bench-diff-") as tmp:
        for label, (old_req, new_req, member, fixed) in PAIRS.items():
            old = fetch(old_req, member, Path(tmp))
            new = fetch(new_req, member, Path(tmp))
            seconds, rss = [], []
            changes: list[dict[str, Any]] = []
            for _ in range(trials):
                elapsed, peak, changes = run_once(old, new)
                seconds.append(elapsed)
                rss.append(peak)
            ranks = {
                f"{offset:#x}": next(
                    (n for n, c in enumerate(changes, 1) if c["old_offset"] == offset), None
                )
                for offset in fixed
            }
            results[label] = {
                "module": member,
                "old_size": old.stat().st_size,
                "new_size": new.stat().st_size,
                "seconds": seconds,
                "max_rss_bytes": rss,
                "changes": len(changes),
                "fixed_function_ranks": ranks,
            }
    rows = [
        f"| {label} | {median(r['seconds']):.1f} | {max(r['max_rss_bytes']) / (1 << 20):.0f} | "
        f"{r['changes']} | "
        + ", ".join(f"{offset}: #{rank}" for offset, rank in r["fixed_function_ranks"].items())
        + " |"
        for label, r in results.items()
    ]
    lxml = results["lxml 6.0.0 -> 6.0.1 etree"]
    verdict = (
        f"Target on the lxml pair: under {TARGET_SECONDS:.0f} s and 1 GiB; measured "
        f"{median(lxml['seconds']):.1f} s ({median(lxml['seconds']) / TARGET_SECONDS:.2f}x the "
        f"budget) and {max(lxml['max_rss_bytes']) / (1 << 20):.0f} MiB "
        f"({max(lxml['max_rss_bytes']) / TARGET_BYTES:.2f}x the budget)."
    )
    markdown = (
        f"`micropatch diff OLD NEW --json` in a child process, {trials} trials per pair: "
        "median wall-clock time, and the largest maximum RSS (wait4). Rank: where the "
        "function the real-world patch fixes (old offset) comes in the ranked changes.\n\n"
        "| pair | median (s) | max RSS (MiB) | changes | rank of the fixed functions |\n"
        "|---|---:|---:|---:|---|\n" + "\n".join(rows) + "\n\n" + verdict + "\n"
    )
    data = {"trials": trials, "targets": {"seconds": TARGET_SECONDS, "bytes": TARGET_BYTES}}
    data["result"] = results
    _, md_path = report.write(NAME, args, argv, "diff: two builds of a module", data, markdown)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
