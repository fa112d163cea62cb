"""build: time to build and verify one patchlet, for each of the three body kinds.

`micropatch build` (micropatch.trust.artifact.build) on the benchmark target:
parse and validate the source (which compiles a C body with cc), identify the
module file, plan the site (function bounds, branch check), assemble the body
and the trampoline. The same fix is written three ways (assembly, a guard, C),
measured in interleaved order, each trial with a distinct source (a comment
carries the trial number) so that no cache of compiled bodies is hit.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import patches, report
from benchmarks.stats import median, ratio, summary
from benchmarks.target import build, build_command

NAME = "build"
TRIALS = 30
QUICK_TRIALS = 2

BODIES = {
    "asm": 'code = """\n# trial {n}\ncmp edi, 1000\njle ok\nmov edi, 1000\nok:\n"""',
    "guard": 'when = "edi > 1000"  # trial {n}\nthen = "return 2001"',
    "c": (
        'c = """\n#include <micropatch.h>\n/* trial {n} */\n'
        "mp_verdict patchlet(struct mp_regs *r) {{\n"
        "  if ((int)r->rdi > 1000) return MP_RETURN(2001);\n"
        '  return MP_CONTINUE;\n}}\n"""'
    ),
}


def source(build_id: str, kind: str, trial: int) -> str:
    return (
        f'[patch]\nid = "bench-build-{kind}"\nversion = 1\n\n'
        f'[target]\nmodule = "bench_target"\nbuild_id = "{build_id}"\n\n'
        f'[[patchlet]]\nat = "compute"\n{BODIES[kind].format(n=trial)}\n'
    )


def measure(exe: Path, directory: Path, trials: int) -> dict[str, Any]:
    from micropatch.build.artifact import build as build_artifact

    build_id = patches.build_id(exe)
    samples: dict[str, list[float]] = {kind: [] for kind in BODIES}
    for trial in range(trials):
        order = list(BODIES)[trial % 3 :] + list(BODIES)[: trial % 3]
        for kind in order:
            path = directory / f"{kind}-{trial}.toml"
            path.write_text(source(build_id, kind, trial))
            start = time.perf_counter()
            build_artifact(path, exe)
            samples[kind].append(time.perf_counter() - start)
    return {
        kind: {"summary": summary(values), "samples": values} for kind, values in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    args = report.parse(parser, argv)
    trials = QUICK_TRIALS if args.quick else TRIALS
    with tempfile.TemporaryDirectory(prefix="micropatch-bench-") as tmp:
        exe = build(Path(tmp))
        result = measure(exe, Path(tmp), trials)
    asm = median(result["asm"]["samples"])
    rows = [
        f"| {kind} | {report.ms(median(r['samples']))} | "
        f"{report.ms(r['summary']['p90'])} | {ratio(median(r['samples']), asm):.2f}x |"
        for kind, r in result.items()
    ]
    markdown = (
        f"Wall-clock time of `micropatch.trust.artifact.build` for a source with one "
        f"patchlet at `compute` of the benchmark target, {trials} trials per kind, "
        "interleaved; each trial's source differs by a comment, so nothing is cached. "
        "A C body includes running `cc`.\n\n"
        "| body | median (ms) | p90 (ms) | ÷ asm |\n|---|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    data = {
        "target": {"source": "benchmarks/targets/bench_target.c", "build": build_command()},
        "trials": trials,
        "result": result,
    }
    _, md_path = report.write(NAME, args, argv, "build: time per patchlet", data, markdown)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
