"""peers' tools: how each one patches the target (micropatch's CLI and API, gdb,
Frida's API and CLI), and what each needs before the clock starts."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import patches
from benchmarks.target import symbol_offsets

FRIDA_TIMEOUT = 60
IMPORT_CLI = "import micropatch.cli.main"

FRIDA_SCRIPT = """\
const m = Process.getModuleByName('bench_target');
Interceptor.replace(m.getExportByName('compute'), m.getExportByName('compute_alt'));
Interceptor.flush();
send('done');
"""

TOOLS = {
    "micropatch_cli": "`micropatch apply` (CLI process)",
    "micropatch_live": "`live.apply` (in-process)",
    "gdb_cli": "gdb -batch -p (CLI process)",
    "frida_api": "Frida `Interceptor.replace` (Python API, in-process)",
    "frida_cli": "`frida -q --eternalize` (CLI process)",
}


# How each tool's change is undone after the measurement, where it can be.
UNDO = {
    "micropatch_cli": "live.remove",
    "micropatch_live": "live.remove",
    "frida_api": "detach (hook reverted)",
}


class ToolFailed(Exception):
    """The tool did not patch the target; the message says what it printed."""


@dataclass
class Context:
    exe: Path
    workdir: Path
    patch: Any = None  # admitted patch, for live.apply
    patch_path: Path | None = None
    jump: bytes = b""
    unavailable: dict[str, str] = field(default_factory=dict)
    frida_sessions: list[Any] = field(default_factory=list)


def timed_run(argv: list[str], timeout: float = 120) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise ToolFailed(
            f"{argv[0]} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-600:]}"
        )
    return elapsed


def micropatch_command() -> list[str]:
    exe = shutil.which("micropatch")
    return [exe] if exe else [sys.executable, "-m", "micropatch.cli.main"]


def micropatch_cli(ctx: Context, pid: int) -> float:
    # A TOML source needs --allow-unsigned: signing is not what is measured here.
    return timed_run(
        [*micropatch_command(), "apply", str(ctx.patch_path), "--pid", str(pid), "--allow-unsigned"]
    )


def micropatch_live(ctx: Context, pid: int) -> float:
    from micropatch import live

    start = time.perf_counter()
    live.apply(ctx.patch, pid)
    return time.perf_counter() - start


GDB = ["gdb", "-nx", "-batch", "-iex", "set debuginfod enabled off"]


def gdb_cli(ctx: Context, pid: int) -> float:
    values = ", ".join(f"{b:#04x}" for b in ctx.jump)
    set_jump = f"set {{unsigned char[{len(ctx.jump)}]}}compute = {{{values}}}"
    return timed_run([*GDB, "-p", str(pid), "-ex", set_jump])


def frida_api(ctx: Context, pid: int) -> float:
    import frida

    done = threading.Event()
    messages: list[Any] = []

    def on_message(message: Any, data: Any) -> None:
        messages.append(message)
        done.set()

    start = time.perf_counter()
    session = frida.attach(pid)
    ctx.frida_sessions.append(session)
    script = session.create_script(FRIDA_SCRIPT)
    script.on("message", on_message)
    script.load()
    if not done.wait(FRIDA_TIMEOUT):
        raise ToolFailed(f"no message from the Frida script within {FRIDA_TIMEOUT} s")
    elapsed = time.perf_counter() - start
    if messages[0].get("payload") != "done":
        raise ToolFailed(f"Frida script: {messages[0]}")
    return elapsed


def frida_cli(ctx: Context, pid: int) -> float:
    script = ctx.workdir / "replace.js"
    frida = shutil.which("frida")
    if frida is None:
        raise ToolFailed("no `frida` command on PATH (pip install frida-tools)")
    return timed_run([frida, "-p", str(pid), "-l", str(script), "-q", "--eternalize"])


RUNNERS: dict[str, Callable[[Context, int], float]] = {
    "micropatch_cli": micropatch_cli,
    "micropatch_live": micropatch_live,
    "gdb_cli": gdb_cli,
    "frida_api": frida_api,
    "frida_cli": frida_cli,
}


def stop_frida() -> None:
    """Let Frida's local helper process go, if this process started one."""
    if "frida" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["frida"].shutdown()


def setup(ctx: Context) -> None:
    """Everything a tool needs before the clock starts; a tool that cannot work says why."""
    offsets = symbol_offsets(ctx.exe, ["compute", "compute_alt"])
    rel = offsets["compute_alt"] - (offsets["compute"] + 5)
    ctx.jump = b"\xe9" + rel.to_bytes(4, "little", signed=True)
    (ctx.workdir / "replace.js").write_text(FRIDA_SCRIPT)
    error = patches.engine_error()
    if error is None:
        try:
            text = patches.source(
                "bench-peers", patches.build_id(ctx.exe), "compute", patches.PLUS_ONE
            )
            ctx.patch_path = ctx.workdir / "bench-peers.toml"
            ctx.patch_path.write_text(text)
            # live.apply takes a patch the trust policy admitted: here, the unsigned
            # source, as `micropatch apply --allow-unsigned` admits it.
            from micropatch.trust.admission import admit

            ctx.patch = admit(
                text.encode(), name=ctx.patch_path.name, keys=None, allow_unsigned=True
            )
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if error is not None:
        ctx.unavailable["micropatch_cli"] = ctx.unavailable["micropatch_live"] = f"engine: {error}"
    if shutil.which("gdb") is None:
        ctx.unavailable["gdb_cli"] = "no gdb on PATH"
    try:
        import frida  # noqa: F401  (imported before any clock starts)
    except Exception as e:
        ctx.unavailable["frida_api"] = ctx.unavailable["frida_cli"] = (
            f"import frida: {type(e).__name__}: {e}"
        )


def versions() -> dict[str, str]:
    out = {}
    try:
        out["gdb"] = subprocess.run(
            ["gdb", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        out["gdb"] = "unavailable"
    try:
        import frida

        out["frida"] = frida.__version__
    except Exception:
        out["frida"] = "unavailable"
    return out
