"""Where results go and what they say about the run: command, machine, date."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
QUICK_NOTE = " (quick smoke run: too few samples to quote)"


def arguments(name: str, description: str, argv: list[str] | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick and --out."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for NAME.json and NAME.md "
        "(default benchmarks/results, or benchmarks/results/quick with --quick)",
    )
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the options, and note how busy the machine is as the benchmark starts."""
    args = parser.parse_args(argv)
    args.load_at_start = load_average()
    return args


def out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return RESULTS / "quick" if args.quick else RESULTS


def command(name: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", f"benchmarks.{name}", *args])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return head + ("+uncommitted src changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "micropatch_commit": _git_commit(),
        "load_average_at_end": load_average(),
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def write(
    name: str,
    args: argparse.Namespace,
    argv: list[str] | None,
    title: str,
    data: dict[str, Any],
    markdown: str,
) -> tuple[Path, Path]:
    """Write NAME.json (everything, raw samples included) and NAME.md (the table)."""
    directory = out_dir(args)
    directory.mkdir(parents=True, exist_ok=True)
    m = machine()
    load_at_start = getattr(args, "load_at_start", None)
    m["load_average_at_start"] = load_at_start
    meta: dict[str, Any] = {
        "benchmark": name,
        "command": command(name, argv),
        "date": now(),
        "machine": m,
    }
    full = {**meta, "quick": bool(args.quick), **data}
    json_path = directory / f"{name}.json"
    json_path.write_text(json.dumps(_clean(full), indent=2, default=_jsonable) + "\n")
    head = (
        f"# {title}\n\n"
        f"- command: `{meta['command']}`{QUICK_NOTE if args.quick else ''}\n"
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}\n"
        f"- micropatch: {m['micropatch_commit']}\n"
        f"- load average (1/5/15 min) at start: {load_at_start or '?'}, "
        f"at end: {m['load_average_at_end']} (on {m['nproc']} CPUs; the targets' own "
        "spinning threads count in it)\n"
        f"- date: {meta['date']}\n\n"
    )
    md_path = directory / f"{name}.md"
    md_path.write_text(head + markdown.rstrip() + "\n")
    return json_path, md_path


def _clean(value: object) -> object:
    """NaN and infinities become null: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"
