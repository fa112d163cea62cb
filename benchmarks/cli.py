"""cli: what one `micropatch` command costs, side by side with gdb in the same run.

Issue 18.1. On one bench_target of 4 threads (the main thread waiting for a
command, 3 blocked in read()), each trial runs, as whole processes:

- `micropatch apply ART --pid P`: a signed artifact, its key in
  $MICROPATCH_TRUST_DIR, no agent answering (the command looks for one, as it
  does by default, on a socket of the run's own), against
  `gdb -batch -p P -ex 'set {unsigned char[5]}compute = {...}'` writing the same
  5-byte jump over compute() (to compute_alt, which returns what the patch does);
- `micropatch status --pid P` with the patch applied, against `gdb -batch -p P`
  attaching and detaching;
- `micropatch remove ID --pid P`, against gdb writing the original 5 bytes back;
- for reference, `micropatch apply` of the same patch built without precomputed
  trampolines (as artifacts built before them are: `payload.sites[].trampoline`
  absent, docs/signing.md), which assembles them at apply time; then a remove
  (in the JSON, not in the table).

CPU is the process's user + system time as the kernel accounted it (wait4), wall
the time from start to exit. Even trials run micropatch first, odd ones gdb; one
warm-up trial is not recorded (it also writes the byte code, which `pip install`
compiles for an installed package); after each change the target's compute(5) is
checked (11 unpatched, 12 patched). For reference, in the same trials: the bare
interpreter (`python -c pass`). What each verb loads is listed from one run of
each under a wrapper that prints sys.modules at exit.

Aims (issue 18.1): apply CPU ≤ 0.5x gdb's; status wall ≤ 0.4x gdb's attach +
detach on an idle machine; remove and status never load the assembler, the C
toolchain, pydantic models or pyelftools.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import patches, report
from benchmarks.stats import median, percentile, ratio
from benchmarks.target import Target, build, symbol_offsets

NAME = "cli"
TRIALS = 40
QUICK_TRIALS = 3
PATCH_ID = "bench-cli"
GDB = ["gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off"]
PAIRS = {  # what is compared: micropatch's command, gdb's doing the same
    "apply": ("micropatch apply", "gdb: write the 5-byte jump"),
    "status": ("micropatch status --pid", "gdb: attach + detach"),
    "remove": ("micropatch remove", "gdb: write the 5 original bytes"),
}
HEAVY = ("pydantic", "typer", "click", "rich", "keystone", "iced_x86", "elftools",
         "cryptography", "micropatch.bodies", "micropatch.build",
         "micropatch.patch.model")  # fmt: skip
ASSEMBLED = "micropatch apply, trampolines assembled"
ISSUE = "apply 425-457 ms CPU vs gdb 211-215 ms; status --pid 204-215 ms wall, 0.52x gdb"
MODULES_WRAPPER = (
    "import sys\n"
    "sys.argv = ['micropatch', *sys.argv[1:]]\n"
    "from micropatch.cli.entry import main\n"
    "try:\n    main()\n"
    "finally:\n    print('@@' + ' '.join(sorted(sys.modules)), file=sys.stderr)\n"
)


class Failed(Exception):
    """A command did not do what it should; the message says what it printed."""


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one process running `argv`."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stdout is not None and process.stderr is not None
    out, err = process.stdout.read(), process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    if process.returncode != 0:
        raise Failed(f"{argv[0]} exited {process.returncode}: {(err or out).decode()[-600:]}")
    return usage.ru_utime + usage.ru_stime, wall


class Bench:
    """The commands of one trial, on one target."""

    def __init__(self, workdir: Path) -> None:
        from micropatch.build.artifact import build as build_artifact
        from micropatch.trust.keys import generate_key, write_key_pair

        self.exe = build(workdir)
        offsets = symbol_offsets(self.exe, ["compute", "compute_alt"])
        self.jump = b"\xe9" + (offsets["compute_alt"] - offsets["compute"] - 5).to_bytes(
            4, "little", signed=True
        )
        source = workdir / f"{PATCH_ID}.toml"
        source.write_text(
            patches.source(PATCH_ID, patches.build_id(self.exe), "compute", patches.PLUS_ONE)
        )
        key = generate_key("bench")
        trust = workdir / "trusted"
        trust.mkdir()
        write_key_pair(key, trust / "bench")
        (trust / "bench.key").unlink()  # only the public key is trusted, as on a host
        built = build_artifact(source, self.exe)
        self.original = built.payload.sites[0].original_bytes
        self.artifact = built.signed(key).write(workdir)
        (workdir / "assembled").mkdir()
        self.assembled = _without_templates(built).signed(key).write(workdir / "assembled")
        # No agent: the command looks for one, as by default, on a socket nobody serves.
        self.env = {**os.environ, "MICROPATCH_TRUST_DIR": str(trust),
                    "MICROPATCH_AGENT_SOCKET": str(workdir / "no-agent.sock")}  # fmt: skip
        self.env.pop("MICROPATCH_NO_AGENT", None)
        # Byte code cached, as an installed package has it (pip compiles it at install):
        # the warm-up trial writes it even where PYTHONDONTWRITEBYTECODE is set.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.micropatch = shutil.which("micropatch") or "micropatch"

    def commands(self, pid: int) -> dict[str, list[str]]:
        def write(code: bytes) -> list[str]:
            values = ", ".join(f"{b:#04x}" for b in code)
            command = f"set {{unsigned char[{len(code)}]}}compute = {{{values}}}"
            return [*GDB, "-p", str(pid), "-ex", command]

        mp, p = self.micropatch, str(pid)
        return {
            "micropatch apply": [mp, "apply", str(self.artifact), "--pid", p],
            "micropatch status --pid": [mp, "status", "--pid", p],
            "micropatch remove": [mp, "remove", PATCH_ID, "--pid", p],
            ASSEMBLED: [mp, "apply", str(self.assembled), "--pid", p],
            "micropatch remove, again": [mp, "remove", PATCH_ID, "--pid", p],
            "gdb: write the 5-byte jump": write(self.jump),
            "gdb: attach + detach": [*GDB, "-p", p],
            "gdb: write the 5 original bytes": write(self.original),
            "python -c pass": [sys.executable, "-c", "pass"],
        }


# Each step: the command, and compute(5) after it (None: not checked).
MICROPATCH_STEPS = [("micropatch apply", 12), ("micropatch status --pid", 12),
                    ("micropatch remove", 11), (ASSEMBLED, 12),
                    ("micropatch remove, again", 11)]  # fmt: skip
GDB_STEPS = [("gdb: write the 5-byte jump", 12), ("gdb: attach + detach", 12),
             ("gdb: write the 5 original bytes", 11)]  # fmt: skip


def _without_templates(artifact: Any) -> Any:
    """`artifact` as built before precomputed trampolines: its sites without them."""
    import json

    from micropatch.trust.artifact import Artifact
    from micropatch.trust.canonical import canonical_json
    from micropatch.trust.payload import Payload

    payload = json.loads(artifact.canonical)
    for site in payload["sites"]:
        del site["trampoline"]
    return Artifact(Payload.model_validate(payload), canonical_json(payload), (), artifact.name)


def trials(bench: Bench, count: int) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {}
    errors: dict[str, list[str]] = {}
    with Target(bench.exe, spin=0, blocked=3, mainspin=False) as target:
        commands = bench.commands(target.pid)
        for trial in range(1 + count):
            steps = MICROPATCH_STEPS + GDB_STEPS if trial % 2 == 0 else GDB_STEPS + MICROPATCH_STEPS
            for name, expected in [*steps, ("python -c pass", None)]:
                print(f"cli: trial {trial}/{count} {name}", file=sys.stderr)
                try:
                    cpu, wall = run(commands[name], bench.env)
                    if expected is not None and target.call(5) != expected:
                        raise Failed(f"compute(5) is not {expected} after {name}")
                except Failed as e:
                    errors.setdefault(name, []).append(str(e))
                    _restore(bench, target, commands)
                    continue
                if trial:
                    s = samples.setdefault(name, {"cpu": [], "wall": []})
                    s["cpu"].append(cpu)
                    s["wall"].append(wall)
        alive = target.alive()
    return {"samples": samples, "errors": errors, "target_alive": alive}


def _restore(bench: Bench, target: Target, commands: dict[str, list[str]]) -> None:
    """After a failure: no patch, original bytes, whatever the state was."""
    for name in ("micropatch remove", "gdb: write the 5 original bytes"):
        with contextlib.suppress(Failed):
            run(commands[name], bench.env)
    if target.call(5) != 11:
        raise RuntimeError("the target could not be restored; stopping")


def modules(bench: Bench, pid: int) -> dict[str, dict[str, Any]]:
    """What each verb loads: the number of modules, and which heavy ones."""
    verbs = {
        "apply": ["apply", str(bench.artifact), "--pid", str(pid)],
        "status": ["status", "--pid", str(pid)],
        "remove": ["remove", PATCH_ID, "--pid", str(pid)],
    }
    found = {}
    for verb, argv in verbs.items():
        done = subprocess.run([sys.executable, "-c", MODULES_WRAPPER, *argv], env=bench.env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        loaded = done.stderr.rpartition("@@")[2].split()
        heavy = sorted({h for h in HEAVY for m in loaded if m == h or m.startswith(h + ".")})
        found[verb] = {"modules": len(loaded), "heavy": heavy, "exit": done.returncode}
    return found


def summarize(samples: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, s in samples.items():
        out[name] = {
            k: {"n": len(v), "median": median(v), "p90": percentile(v, 90),
                "p99": percentile(v, 99), "min": min(v), "max": max(v)}
            for k, v in s.items()
        }  # fmt: skip
    for verb, (mine, theirs) in PAIRS.items():
        if mine in samples and theirs in samples:
            a, b = samples[mine], samples[theirs]
            out[f"ratio {verb}"] = {
                k: {
                    "of_medians": ratio(median(a[k]), median(b[k])),
                    "paired_median": median([x / y for x, y in zip(a[k], b[k], strict=False)]),
                }
                for k in ("cpu", "wall")
            }
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"{result['trials']} trials on one bench_target of 4 threads (3 blocked in read()), "
        "micropatch and gdb in alternating order, one unrecorded warm-up; CPU = user + system "
        "time of the process (wait4), wall = start to exit. In ms: **median** / p90 / p99.",
        "",
        "| command | CPU (ms) | wall (ms) | errors |",
        "|---|---:|---:|---:|",
    ]
    for name in [*(n for pair in PAIRS.values() for n in pair), ASSEMBLED, "python -c pass"]:
        if name not in s:
            lines.append(f"| {name} | not measured | | {len(result['errors'].get(name, []))} |")
            continue
        c, w = s[name]["cpu"], s[name]["wall"]
        cells = [f"**{report.ms(x['median'])}** / {report.ms(x['p90'])} / {report.ms(x['p99'])}"
                 for x in (c, w)]  # fmt: skip
        errors = len(result["errors"].get(name, []))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {errors} |")
    lines += ["", f"{ASSEMBLED}: the same patch built without precomputed trampolines "
              "(as artifacts built before them), assembled at apply time; the remove after it "
              "is in the JSON only.", "",
              "Ratios, micropatch ÷ gdb (of the medians; median of the per-trial ratios):",
              ""]  # fmt: skip
    aims = {"apply": ("cpu", 0.5), "status": ("wall", 0.4), "remove": (None, None)}
    for verb in PAIRS:
        r = s.get(f"ratio {verb}")
        if r is None:
            continue
        cpu, wall = r["cpu"], r["wall"]
        text = (f"- {verb}: CPU {cpu['of_medians']:.2f}x ({cpu['paired_median']:.2f}x), "
                f"wall {wall['of_medians']:.2f}x ({wall['paired_median']:.2f}x)")  # fmt: skip
        kind, bound = aims[verb]
        if kind is not None:
            met = r[kind]["of_medians"] <= bound
            text += f" — aim {kind} ≤ {bound}x: {'met' if met else 'NOT met'}"
        lines.append(text)
    lines += ["", "What each verb loads (one run each; heavy: the packages issue 18.1 names):", "",
              "| verb | modules | heavy packages loaded |", "|---|---:|---|"]  # fmt: skip
    for verb, m in result["modules"].items():
        lines.append(f"| {verb} | {m['modules']} | {', '.join(m['heavy']) or 'none'} |")
    lines += ["", f"For reference, the issue's figures before this work: {ISSUE}.",
              f"Target alive at the end: {result['target_alive']}."]  # fmt: skip
    for name, errs in result["errors"].items():
        lines.append(f"- first error of {name}: `{errs[0][:300]}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = report.arguments(NAME, __doc__.splitlines()[0], argv)
    parser.add_argument("--trials", type=int, default=None, help=f"default {TRIALS}")
    args = report.parse(parser, argv)
    count = args.trials or (QUICK_TRIALS if args.quick else TRIALS)
    if shutil.which("gdb") is None:
        print("cli: gdb is needed for the comparison", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        bench = Bench(Path(tmp))
        result = trials(bench, count)
        with Target(bench.exe, spin=0, blocked=3, mainspin=False) as target:
            result["modules"] = modules(bench, target.pid)  # apply, status, remove in turn
    result["trials"] = count
    result["summary"] = summarize(result["samples"])
    json_path, md_path = report.write(
        NAME, args, argv, "cli: one micropatch command against gdb", result, markdown(result)
    )
    print(md_path.read_text())
    print(f"cli: wrote {json_path} and {md_path}", file=sys.stderr)
    failed = any(n.startswith("micropatch") for n in result["errors"]) or not result["target_alive"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
