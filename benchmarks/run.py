"""Run every benchmark in turn: `python -m benchmarks.run [--quick] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import (
    agent,
    agent_exec,
    agent_index,
    build,
    chaos,
    cli,
    diff,
    fleet_publish,
    overhead,
    pause,
    peers,
    python,
    server,
    soak,
    watchdog,
)

BENCHMARKS = {
    "pause": pause,
    "overhead": overhead,
    "peers": peers,
    "cli": cli,
    "soak": soak,
    "chaos": chaos,
    "build": build,
    "diff": diff,
    "agent": agent,
    "agent_exec": agent_exec,
    "agent_index": agent_index,
    "server": server,
    "fleet_publish": fleet_publish,
    "python": python,
    "watchdog": watchdog,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of every benchmark")
    parser.add_argument("--out", help="directory for the results (default benchmarks/results)")
    parsed = parser.parse_args(argv)
    args = (["--quick"] if parsed.quick else []) + (["--out", parsed.out] if parsed.out else [])
    status = 0
    for name, module in BENCHMARKS.items():
        start = time.perf_counter()
        print(f"== {name}", file=sys.stderr)
        try:
            code = module.main(list(args))
        except Exception as e:  # one broken benchmark must not hide the others' results
            print(f"== {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
        print(f"== {name}: exit {code} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main())
