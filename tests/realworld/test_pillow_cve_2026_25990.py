"""CVE-2026-25990 in Pillow 12.1.0, micropatched in running interpreters.

Pillow 12.1.0 is installed from PyPI into a temporary venv. For each public
proof-of-concept PSD, a fresh interpreter crashes on it; a running interpreter
that has already decoded normal images is patched live, then reports the clean
error of Pillow 12.1.1 on the PoC, decodes the normal images exactly as before,
and is unpatched again. Pillow 12.1.1 itself is installed to check that the
error text is the same.
"""

from __future__ import annotations

import hashlib
import json
import queue
import resource
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropatch import live
from micropatch.patch.model import Patch
from micropatch.process.maps import read_maps
from micropatch.trust.admission import Admitted, admit

from .venvs import site_packages, venv_python

pytestmark = [
    pytest.mark.realworld,
    pytest.mark.skipif(
        sys.platform != "linux" or sys.version_info[:2] != (3, 11),
        reason="the patch targets the CPython 3.11 x86-64 Linux build of Pillow 12.1.0",
    ),
]

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "patches" / "pillow-CVE-2026-25990" / "patch.toml"
POCS = PATCH.parent / "pocs"  # copies of ../shared/pocs/pillow-CVE-2026-25990 (public test data)
POC_NAMES = ["psd-oob-write.psd", "psd-oob-write-x.psd", "psd-oob-write-y.psd"]
MODULE = "_imaging.cpython-311-x86_64-linux-gnu.so"

VULNERABLE = "pillow==12.1.0"
FIXED = "pillow==12.1.1"
ERROR = "ValueError: tile cannot extend outside image"  # what 12.1.1 raises on the PoCs
CRASHES = {-signal.SIGSEGV, -signal.SIGABRT}
TIMEOUT = 30.0

TRIGGER = textwrap.dedent("""
    import sys
    from PIL import Image
    im = Image.open(sys.argv[1])
    im.seek(im.n_frames)
    im.load()
""")

# Tile extents handed straight to a codec's setimage(): negative offsets are
# what the fix refuses; the others are valid, or refused already by 12.1.0.
EXTENTS = [(0, 0, 4, 4), (2, 3, 8, 8), (-1, 0, 4, 4), (0, -1, 4, 4), (-4, -4, 4, 4), (0, 0, 9, 4)]
TILE_ERROR = "tile cannot extend outside image"
SETIMAGE_FIXED = {  # as Pillow 12.1.1 answers (checked by test_fixed_release_answers_the_same)
    **{f"decoder {e}": "ok" for e in EXTENTS[:2]},
    **{f"decoder {e}": f"ValueError: {TILE_ERROR}" for e in EXTENTS[2:]},
    **{f"encoder {e}": "ok" for e in EXTENTS[:2]},
    **{f"encoder {e}": f"SystemError: {TILE_ERROR}" for e in EXTENTS[2:]},
}
SETIMAGE_VULNERABLE = {  # 12.1.0 accepts negative offsets (harmless here: nothing is decoded)
    **SETIMAGE_FIXED,
    **{f"{kind} {e}": "ok" for kind in ("decoder", "encoder") for e in EXTENTS[2:5]},
}

MAKE_INPUTS = textwrap.dedent("""
    import sys
    from PIL import Image, ImageDraw
    out = sys.argv[1]
    im = Image.new("RGB", (48, 32))
    im.putdata([(x * 5, y * 7, (x + y) * 3) for y in range(32) for x in range(48)])
    im.save(out + "/normal.png")
    frames = []
    for i in range(3):
        frame = Image.new("RGB", (32, 24), (10, 20, 30))
        ImageDraw.Draw(frame).rectangle((8 + i * 4, 6 + i * 2, 14 + i * 4, 12 + i * 2), fill=(200, 100, 50))
        frames.append(frame)
    # Frames after the first are stored as sub-rectangles: tiles with positive offsets.
    frames[0].save(out + "/normal.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
""")

# The long-running interpreter: decodes the normal inputs, says "ready", then
# answers one line per command on stdin.
WORKER = textwrap.dedent("""
    import hashlib, json, sys
    from PIL import Image

    EXTENTS = json.loads(sys.argv[1])
    INPUTS = sys.argv[2:]

    def normal():
        results = {}
        for path in INPUTS:
            with Image.open(path) as im:
                for frame in range(getattr(im, "n_frames", 1)):
                    im.seek(frame)
                    extents = [list(tile.extents) for tile in im.tile]
                    im.load()
                    data = im.convert("RGB").tobytes()
                    results[f"{path} frame {frame}"] = [
                        im.mode, list(im.size), extents, hashlib.sha256(data).hexdigest()]
        # A raw tile with positive offsets, decoded into an image and encoded back.
        im = Image.new("L", (8, 8), 7)
        decoder = Image._getdecoder("L", "raw", ("L", 0, 1))
        decoder.setimage(im.im, (2, 3, 6, 7))
        decoder.decode(bytes(range(100, 116)))
        results["raw tile"] = list(im.tobytes())
        encoder = Image._getencoder("L", "raw", ("L", 0, 1))
        encoder.setimage(im.im, (1, 2, 7, 8))
        results["raw encode"] = encoder.encode(4096)[2].hex()
        return results

    def setimage():
        im = Image.new("L", (8, 8))
        answers = {}
        for kind, get in (("decoder", Image._getdecoder), ("encoder", Image._getencoder)):
            for extents in EXTENTS:
                codec = get("L", "raw", ("L", 0, 1))
                try:
                    codec.setimage(im.im, tuple(extents))
                    answer = "ok"
                except Exception as e:
                    answer = f"{type(e).__name__}: {e}"
                answers[f"{kind} {tuple(extents)}"] = answer
        return answers

    def trigger(path):
        try:
            im = Image.open(path)
            im.seek(im.n_frames)
            im.load()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    if INPUTS:
        print(json.dumps(normal()), flush=True)
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "normal":
            print(json.dumps(normal()), flush=True)
        elif command == "setimage":
            print(json.dumps(setimage()), flush=True)
        elif command == "poc":
            print(trigger(argument), flush=True)
        elif command == "quit":
            break
""")


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class Worker:
    """An interpreter of the venv running WORKER, driven one line at a time."""

    def __init__(self, python: Path, inputs: list[Path], stderr: Path) -> None:
        self._stderr_path = stderr
        self._stderr = stderr.open("w")
        self.proc = subprocess.Popen(
            [str(python), "-c", WORKER, json.dumps(EXTENTS), *map(str, inputs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, preexec_fn=_no_core_dumps,
        )  # fmt: skip
        self.pid = self.proc.pid
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put("")  # end of output: the process exited

    def line(self) -> str:
        try:
            line = self._lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"worker {self.pid}: no answer in {TIMEOUT:.0f} s") from None
        if not line:
            code = self.proc.wait(timeout=TIMEOUT)
            raise AssertionError(
                f"worker {self.pid} exited with {code} ({_describe(code)}); stderr:\n"
                + self._stderr_path.read_text()[-2000:]
            )
        return line

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line()

    def quit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        return self.proc.wait(timeout=TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


@pytest.fixture(scope="module")
def patch() -> Admitted:
    return admit(PATCH.read_bytes(), name=str(PATCH), keys=None, allow_unsigned=True)


@pytest.fixture(scope="module")
def vulnerable(patch: Patch) -> Path:
    """The python of a venv with Pillow 12.1.0, whose _imaging is the patch's exact build."""
    python = venv_python(VULNERABLE)
    module = site_packages(python) / "PIL" / MODULE
    digest = hashlib.sha256(module.read_bytes()).hexdigest()
    assert digest == patch.patch.target.sha256, (
        f"pip installed a different build of {VULNERABLE} ({module}: sha256 {digest}); "
        f"the patch is for {patch.patch.target.sha256}"
    )
    return python


@pytest.fixture(scope="module")
def inputs(vulnerable: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A PNG and an animated GIF (frames with tile offsets), made with Pillow itself."""
    out = tmp_path_factory.mktemp("pillow-inputs")
    subprocess.run([str(vulnerable), "-c", MAKE_INPUTS, str(out)], check=True, timeout=TIMEOUT)
    return [out / "normal.png", out / "normal.gif"]


@pytest.fixture
def worker(vulnerable: Path, inputs: list[Path], tmp_path: Path) -> Iterator[Worker]:
    w = Worker(vulnerable, inputs, tmp_path / "worker.stderr")
    try:
        yield w
    finally:
        w.close()


def _poc(name: str) -> Path:
    path = POCS / name
    if not path.is_file():
        pytest.skip(f"proof-of-concept input {path} is missing")
    return path


@pytest.mark.parametrize("name", POC_NAMES)
def test_unpatched_interpreter_crashes(vulnerable: Path, name: str) -> None:
    done = subprocess.run(
        [str(vulnerable), "-c", TRIGGER, str(_poc(name))],
        capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=_no_core_dumps,
    )  # fmt: skip
    assert done.returncode in CRASHES, (
        f"Pillow 12.1.0 on {name}: {_describe(done.returncode)}, expected a crash; "
        f"stderr: {done.stderr[-1000:]}"
    )


@pytest.mark.parametrize("name", POC_NAMES)
def test_live_patch_turns_the_crash_into_the_fixed_error(
    worker: Worker, patch: Patch, name: str
) -> None:
    poc = _poc(name)
    before = json.loads(worker.line())
    assert worker.line() == "ready"
    gif_offsets = [extents for key in before if ".gif" in key for extents in before[key][2]]
    assert any(e[0] > 0 and e[1] > 0 for e in gif_offsets), gif_offsets  # offsets are exercised
    assert any(m.path.endswith("/PIL/" + MODULE) for m in read_maps(worker.pid))
    assert json.loads(worker.ask("setimage")) == SETIMAGE_VULNERABLE

    outcome = live.apply(patch, worker.pid)
    assert (outcome.action, outcome.sites) == ("applied", 2)
    assert [s.patch_id for s in live.status(worker.pid)] == [patch.id]

    assert worker.ask(f"poc {poc}") == ERROR
    assert json.loads(worker.ask("normal")) == before
    assert json.loads(worker.ask("setimage")) == SETIMAGE_FIXED
    assert worker.ask(f"poc {poc}") == ERROR  # again: the process is still sound

    outcome = live.remove(patch.id, worker.pid)
    assert (outcome.action, outcome.sites) == ("removed", 2)
    assert live.status(worker.pid) == []
    assert not [m for m in read_maps(worker.pid) if "memfd:micropatch" in m.path]
    assert json.loads(worker.ask("normal")) == before
    assert json.loads(worker.ask("setimage")) == SETIMAGE_VULNERABLE  # the original code again
    assert worker.quit() == 0


def test_fixed_release_answers_the_same() -> None:
    """Pillow 12.1.1 raises exactly the error the patched 12.1.0 reports, on every PoC."""
    fixed = venv_python(FIXED)
    for name in POC_NAMES:
        done = subprocess.run(
            [str(fixed), "-c", TRIGGER, str(_poc(name))],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines()[-1] == ERROR, done.stderr
    answers = subprocess.run(
        [str(fixed), "-c", WORKER, json.dumps(EXTENTS)],  # no inputs: only setimage
        input="setimage\nquit\n", capture_output=True, text=True, timeout=TIMEOUT, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert answers[0] == "ready"
    assert json.loads(answers[1]) == SETIMAGE_FIXED


@pytest.mark.parametrize("name", POC_NAMES)
def test_dev_run_patches_the_interpreter_from_its_start(vulnerable: Path, name: str) -> None:
    """`micropatch dev run` starts the interpreter, patches _imaging when Python dlopens
    it, and the PoC ends in 12.1.1's clean error instead of a crash."""
    done = subprocess.run(
        ["micropatch", "dev", "run", str(PATCH), "--allow-unsigned", "--",
         str(vulnerable), "-c", TRIGGER, str(POCS / name)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # Python's status for an uncaught exception
    assert done.stderr.rstrip().splitlines()[-1] == ERROR or ERROR in done.stderr, done.stderr
    assert f"after dlopen loaded {MODULE}" in done.stderr, done.stderr
