"""python_inventory: what knowing which modules CPython processes imported costs,
read from their memory (`runtimes.cpython.imports`, `runtimes.cpython.inventory`)
against asking inside the process (phase 1's `apply --all`: the page mapped and
the runner run in an interpreter that turns out not to have the module).

N interpreters (Debian's python3.11, each importing json, email.parser, http.client
and decimal, then blocked in a read on stdin), side by side in one run:
1. `imported(pid)`: every name in sys.modules and each module's __file__;
2. `has_module(pid, name)`: the test `apply --all` makes per interpreter;
3. `PythonInventory.interpreters()` over the N: first scan (source files hashed),
   then a second (hashes remembered: only memory is read);
4. the in-process check: `engine.apply` of a patch for a module the process has
   not imported (ModuleNotImported), timed per interpreter, with its pause.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.stats import ratio, summary

NAME = "python_inventory"
PYTHON = "/usr/bin/python3.11"
SCRIPT = "import sys, json, email.parser, http.client, decimal\nprint('ready', flush=True)\n" \
         "sys.stdin.read()\n"  # fmt: skip
MODULE = "def parse(line):\n    return line\n"


def _patch(directory: Path):  # type: ignore[no-untyped-def]
    from micropatch.runtimes.cpython.build import build
    from micropatch.trust.admission import admit_any

    source = directory / "absent.py"
    source.write_text(MODULE)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    toml = directory / "fix.toml"
    toml.write_text(
        '[patch]\nid = "absent-fix"\nversion = 1\n\n[target]\nruntime = "cpython"\n'
        f'module = "absent"\nsha256 = "{digest}"\n\n[[patchlet]]\nat = "parse"\n'
        'when = "len(line) > 9"\nthen = "return \'\'"\n'
    )
    built = build(toml, source, python=PYTHON)
    return admit_any(built.to_bytes(), name="absent", keys=None, allow_unsigned=True)


def main(argv: list[str] | None = None) -> int:
    from micropatch.errors import ModuleNotImported
    from micropatch.runtimes.cpython import engine
    from micropatch.runtimes.cpython.imports import has_module, imported
    from micropatch.runtimes.cpython.inventory import PythonInventory

    args = report.parse(report.arguments(NAME, __doc__ or "", argv), argv)
    count = 4 if args.quick else 20
    procs = [subprocess.Popen([PYTHON, "-c", SCRIPT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(count)]  # fmt: skip
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        pids = [p.pid for p in procs]
        full: list[float] = []
        one: list[float] = []
        inside: list[float] = []
        names: list[int] = []
        for pid in pids:
            t = time.perf_counter()
            names.append(len(imported(pid).modules))
            full.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert not has_module(pid, "absent")
            one.append(time.perf_counter() - t)
        inventory = PythonInventory()
        t = time.perf_counter()
        assert len(inventory.interpreters(pids)) == count
        first = time.perf_counter() - t
        t = time.perf_counter()
        inventory.interpreters(pids)
        second = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            patch = _patch(Path(d))
            for pid in pids:
                t = time.perf_counter()
                with contextlib.suppress(ModuleNotImported):
                    engine.apply(patch, pid)  # type: ignore[arg-type]
                inside.append(time.perf_counter() - t)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    s = {"imported": summary(full), "has_module": summary(one), "inside": summary(inside)}
    ms = lambda k, q="median": f"{s[k][q] * 1e3:.2f}"  # noqa: E731
    markdown = (
        f"CPython {PYTHON}, {count} interpreters ({min(names)}-{max(names)} modules in "
        "sys.modules each), blocked in a read on stdin.\n\n"
        "| per interpreter | median ms | p90 ms |\n|---|---|---|\n"
        f"| `imported(pid)`: every name and __file__, from memory | {ms('imported')} | "
        f"{ms('imported', 'p90')} |\n"
        f"| `has_module(pid, name)`: the `apply --all` test, from memory | {ms('has_module')} | "
        f"{ms('has_module', 'p90')} |\n"
        f"| in-process check (apply → ModuleNotImported: page mapped, runner run) | "
        f"{ms('inside')} | {ms('inside', 'p90')} |\n\n"
        f"In-process check / `has_module`: "
        f"{ratio(s['inside']['median'], s['has_module']['median']):.0f}x "
        "(and the in-process check leaves a page mapped in every interpreter).\n\n"
        f"`PythonInventory.interpreters()` over the {count}: first scan {first * 1e3:.1f} ms "
        f"(source files hashed), second {second * 1e3:.1f} ms (hashes remembered).\n"
    )
    data = {"summary": s, "first_scan": first, "second_scan": second, "names": names}
    report.write(NAME, args, argv, "Which modules CPython processes imported", data, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
