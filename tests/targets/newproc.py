"""New-process targets and a real NewProcesses agent, for tests/integration/test_newproc.py
and benchmarks/agent_exec.py.

`build(out)` compiles the np_* programs (np_main.c, np_ctor.c, np_dlopen.c with
vuln_fn.c); `signed_fixes(out, paths)` builds and signs the bounds-check fix of
copy_packet for np_exe and for libnpvuln.so; `Agent` runs NewProcesses in a
child process (this file's `main`) with a minimal catalog of those artifacts,
so that a test can SIGKILL it for real. The agent runs inside a sandbox
(targets/isolation.py: its own PID and mount namespaces) and watches only the
sandbox's private tmpfs, where the programs are built: it never marks the
host's filesystems nor seizes a program run on the host meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __name__ != "__main__":  # the agent child needs none of the test helpers
    from targets.isolation import Sandbox, children

SOURCE_DIR = Path(__file__).resolve().parent
CFLAGS = (
    "-O2", "-Wall", "-Werror", "-fno-stack-protector", "-fcf-protection=none",
    "-fomit-frame-pointer", "-Wl,--build-id=sha1",
)  # fmt: skip
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
UNPATCHED, PATCHED = "-2", "-1"


def build(out: Path, cc: str | None = None) -> dict[str, Path]:
    """np_exe (copy_packet inside), libnpvuln.so, np_lib_main (DT_NEEDED libnpvuln.so,
    rpath $ORIGIN), np_dlopen, np_thread_exec, np_reload, and np_plain (np_exe's source with
    another build-id: another build, which no patch names)."""
    compiler = cc or os.environ.get("CC") or "cc"
    out.mkdir(parents=True, exist_ok=True)
    s = {
        n: str(SOURCE_DIR / n)
        for n in (
            "np_main.c",
            "vuln_fn.c",
            "np_ctor.c",
            "np_dlopen.c",
            "np_thread_exec.c",
            "np_reload.c",
            "np_fdmap.c",
        )
    }
    commands = {
        "np_exe": ["-fPIE", "-pie", s["np_main.c"], s["vuln_fn.c"]],
        "np_plain": [
            "-fPIE", "-pie", "-Wl,--build-id=0x6e705f706c61696e", s["np_main.c"], s["vuln_fn.c"]
        ],
        "libnpvuln.so": [
            "-fPIC", "-shared", "-Wl,-soname,libnpvuln.so", s["vuln_fn.c"], s["np_ctor.c"],
        ],
        "np_lib_main": [
            "-fPIE", "-pie", "-DNP_LIBRARY", "-Wl,-rpath,$ORIGIN", s["np_main.c"],
            f"-L{out}", "-lnpvuln",
        ],
        "np_dlopen": ["-fPIE", "-pie", s["np_dlopen.c"], "-ldl"],
        "np_thread_exec": ["-fPIE", "-pie", "-pthread", s["np_thread_exec.c"]],
        "np_reload": ["-fPIE", "-pie", s["np_reload.c"], "-ldl"],
        "np_fdmap": ["-fPIE", "-pie", s["np_fdmap.c"]],
    }  # fmt: skip
    paths = {}
    for name, args in commands.items():
        target = out / name
        cmd = [compiler, *CFLAGS, f"-I{SOURCE_DIR}", "-o", str(target), *args]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        paths[name] = target
    return paths


def build_linked(out: Path, name: str, library_dir: str, how: str, cc: str | None = None) -> Path:
    """np_main with copy_packet in libnpvuln.so (out/libnpvuln.so at link time), found at
    run time through `how`: "rpath" (DT_RPATH library_dir), "runpath" (DT_RUNPATH),
    or "none" (LD_LIBRARY_PATH, or nothing)."""
    compiler = cc or os.environ.get("CC") or "cc"
    flags = {
        "rpath": [f"-Wl,--disable-new-dtags,-rpath,{library_dir}"],
        "runpath": [f"-Wl,--enable-new-dtags,-rpath,{library_dir}"],
        "none": [],
    }[how]
    target = out / name
    cmd = [compiler, *CFLAGS, f"-I{SOURCE_DIR}", "-o", str(target), "-fPIE", "-pie",
           "-DNP_LIBRARY", *flags, str(SOURCE_DIR / "np_main.c"), f"-L{out}", "-lnpvuln"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return target


def signed_fixes(out: Path, paths: dict[str, Path]) -> tuple[Path, list[Path]]:
    """A key pair in out/keys and a signed fix for np_exe and for libnpvuln.so:
    (public key, artifacts)."""
    sys.path.insert(0, str(SOURCE_DIR.parent))
    from integration.patching import patch_source

    from micropatch.build.artifact import build as build_artifact
    from micropatch.trust.keys import generate_key, write_key_pair

    (out / "keys").mkdir(parents=True, exist_ok=True)
    key = generate_key("newproc", expires_days=30)
    _, public = write_key_pair(key, out / "keys" / "newproc", force=True)
    artifacts = []
    for name, patch_id in (("np_exe", "np-exe-fix"), ("libnpvuln.so", "np-lib-fix")):
        source = out / f"{patch_id}.toml"
        source.write_text(patch_source(paths[name], [FIX], id=patch_id))
        (out / patch_id).mkdir(exist_ok=True)
        artifacts.append(build_artifact(source, paths[name]).signed(key).write(out / patch_id))
    return public, artifacts


class StaticCatalog:
    """The smallest Catalog: every admitted patch enabled for every process."""

    def __init__(self, patches: list[Any]) -> None:
        self.patches = patches
        self.version = 0

    def wanted(self, info: Any, module: Any) -> list[Any]:
        return [p for p in self.patches if module.matches(p.patch.target)]

    def watched(self) -> list[Any]:
        return [p.patch.target for p in self.patches]

    def changed(self) -> int:
        return self.version


def main(argv: list[str]) -> int:
    """The agent child: `newproc.py PUBLIC_KEY FILESYSTEM ARTIFACT...` (FILESYSTEM: a path
    on the only filesystem watched). Prints `ready` once the index's first walk is
    done, then one JSON line per event; `stats` on stdin prints the stats (the
    index's under "index"); EOF stops it."""
    import logging

    from micropatch.agent.newproc import NewProcesses
    from micropatch.live.mapped import ModuleCache
    from micropatch.trust.admission import admit_file
    from micropatch.trust.keys import load_public_key

    logging.basicConfig(level=os.environ.get("NP_LOG", "WARNING"), stream=sys.stderr)
    public, filesystem, *artifacts = argv
    keys = [load_public_key(public)]
    catalog = StaticCatalog([admit_file(a, keys=keys) for a in artifacts])
    lock = threading.Lock()

    def report(event: Any) -> None:
        line = json.dumps({"kind": event.kind, "pid": event.pid, "patch_id": event.patch_id,
                           "module": event.module, "message": event.message,
                           "when": event.data.get("when"), "data": event.data,
                           "time": event.time})  # fmt: skip
        with lock:
            print(line, flush=True)

    agent = NewProcesses(
        catalog, report, modules=ModuleCache(), filesystems=[filesystem],
        hold_limit=float(os.environ.get("NP_HOLD_LIMIT", "0.05")),
        workers=int(os.environ.get("NP_WORKERS", "64")),
    )  # fmt: skip
    agent.start()
    if not agent.indexer.ready.wait(120):
        print("index not ready", flush=True)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            with lock:
                print("stats " + json.dumps(agent.status()), flush=True)
    agent.stop()
    return 0


class Agent:
    """NewProcesses running in a child process (see `main`) inside `box`, watching its
    tmpfs only."""

    def __init__(
        self,
        box: Sandbox,
        public: Path,
        artifacts: list[Path],
        env: dict[str, str] | None = None,
    ) -> None:
        self.box = box
        self.proc = subprocess.Popen(
            [*box.enter(), sys.executable, __file__, str(public), str(box.root),
             *map(str, artifacts)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        line = self._line(30)
        if line != "ready":
            self.kill()
            raise RuntimeError(f"the agent did not start: {line!r}")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _line(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout) if timeout > 0 else self._lines.get_nowait()
        except queue.Empty:
            return None

    def drain(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Events printed so far (waiting up to timeout for the first new one)."""
        new = []
        while True:
            line = self._line(timeout if not new else 0)
            if not line:
                break
            if line.startswith("{"):
                new.append(json.loads(line))
        self.events += new
        return new

    def wait_events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            self.drain(0.2)
        return self.events

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = self._line(1)
            if line and line.startswith("stats "):
                return dict(json.loads(line[6:]))
            if line and line.startswith("{"):
                self.events.append(json.loads(line))
        raise RuntimeError("the agent did not answer stats")

    def stop(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.drain(0.5)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in children(self.proc.pid):  # nsenter forked the agent
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            try:
                self.stop()
            except Exception:
                self.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
