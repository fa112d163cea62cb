"""`micropatch demo`: the whole story in a few seconds, on the demo's own child.

Builds a toy service with an overflow, shows the exploit working, patches the
running process, shows the exploit blocked while normal use still works,
removes the patch and lets the service exit cleanly. No root needed: a
process may trace its own child.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax

from micropatch import live
from micropatch.elf.identity import identify
from micropatch.errors import MicropatchError
from micropatch.trust.admission import admit

PATCH_TEMPLATE = '''\
[patch]
id = "demo-set-name-bound"
version = 1
title = "set_name: reject names longer than the 16-byte field"

[target]
module = "vulnerable"
build_id = "{build_id}"

[[patchlet]]
at = "set_name"            # the function's entry: len is in edx
code = """
cmp edx, 16                # the missing bound check
jbe ok
mov eax, -1                # return -1: the caller rejects the name
ret
ok:
"""
'''

NORMAL = b"alice"
EXPLOIT = b"A" * 16 + b"\x01"  # one byte past the name: sets is_admin


class _Service:
    def __init__(self, program: Path) -> None:
        self.proc = subprocess.Popen(
            [str(program)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        ready = self._line()
        if not ready.startswith("ready"):
            raise MicropatchError(f"demo: the service did not start: {ready!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def send(self, name: bytes) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"name {name.hex()}\n")
        self.proc.stdin.flush()
        return self._line()

    def quit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        return self.proc.wait(timeout=5)


def _build(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise MicropatchError("demo: no C compiler (cc) found; install gcc (apt-get install gcc)")
    source = workdir / "vulnerable.c"
    source.write_text(resources.files("micropatch.demo").joinpath("vulnerable.c").read_text())
    program = workdir / "vulnerable"
    result = subprocess.run(
        [cc, "-O2", "-o", str(program), str(source)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise MicropatchError(f"demo: cc failed:\n{result.stderr}")
    return program


def run(console: Console) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="micropatch-demo-") as tmp:
        program = _build(Path(tmp))
        with program.open("rb") as f:
            build_id = identify(f).build_id
        source = PATCH_TEMPLATE.format(build_id=build_id)
        # The demo's patch is written here, not signed: admitted as a development source.
        patch = admit(
            source.encode(), name="demo-set-name-bound.toml", keys=None, allow_unsigned=True
        )

        console.rule("[bold]1. A running service with an overflow bug")
        service = _Service(program)
        try:
            _show(console, "normal name", NORMAL, service.send(NORMAL))
            answer = _show(console, "exploit (17 bytes)", EXPLOIT, service.send(EXPLOIT))
            _expect(answer, "admin: YES", "the exploit should work before patching")
            console.print("[red]→ the exploit works: 17 bytes overwrite is_admin[/]")

            console.rule("[bold]2. The micropatch")
            console.print(Syntax(source, "toml", theme="ansi_dark"))
            outcome = live.apply(patch, service.pid)
            console.print(
                f"[green]applied[/] to pid {service.pid} in a {outcome.paused * 1e3:.2f} ms pause, "
                "without restarting it"
            )
            for state in live.status(service.pid):
                sites = ", ".join(f"{a:#x}" for a in state.sites)
                console.print(f"status: {state.patch_id} v{state.version} at {sites}")

            console.rule("[bold]3. The same process, patched")
            answer = _show(console, "exploit (17 bytes)", EXPLOIT, service.send(EXPLOIT))
            _expect(answer, "rejected", "the patched service should reject the exploit")
            answer = _show(console, "normal name", NORMAL, service.send(NORMAL))
            _expect(answer, "hello alice", "normal names should still work")
            console.print("[green]→ exploit blocked, normal use unchanged[/]")

            console.rule("[bold]4. Removing the patch")
            outcome = live.remove(patch.id, service.pid)
            console.print(f"[green]removed[/] in a {outcome.paused * 1e3:.2f} ms pause")
            answer = _show(console, "exploit (17 bytes)", EXPLOIT, service.send(EXPLOIT))
            _expect(answer, "admin: YES", "the original code should be back")
            console.print("→ original code restored, as before the patch")
            code = service.quit()
        except BaseException:
            service.proc.kill()
            service.proc.wait()
            raise
        if code != 0:
            raise MicropatchError(f"demo: the service exited with status {code}")
    console.rule()
    console.print(
        f"service exited cleanly (status 0); demo took {time.perf_counter() - started:.1f} s"
    )


def _show(console: Console, label: str, sent: bytes, answer: str) -> str:
    console.print(f"  send {label:<20} {sent!r:<28} → {answer}", highlight=False)
    return answer


def _expect(answer: str, wanted: str, why: str) -> None:
    if wanted not in answer:
        raise MicropatchError(f"demo: {why}, but the service answered {answer!r}")
