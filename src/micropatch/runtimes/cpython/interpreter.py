"""Finding a CPython interpreter in a process and reading its state.

Everything starts from exported symbols of the module that defines the
interpreter (the `python3.X` executable of a static build, or
`libpython3.X.so`): `_PyRuntime` (the runtime state), `Py_Version` (the
release, 3.11+), and the C API functions the trampoline calls. They are read
from the mapped image (`elf.loaded`), never from the file and never from a
hard-coded address. The structures behind `_PyRuntime` are read with the
release's layout (`versions.py`), and only after invariants that a wrong
layout would break hold: the main interpreter points back at `_PyRuntime`,
every thread state points at the interpreter, and their native thread ids
are threads of the process.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

from micropatch.elf.loaded import LoadedImage
from micropatch.errors import ElfError, InterpreterError, MemoryAccessError
from micropatch.process.maps import Mapping
from micropatch.process.memory import Memory
from micropatch.runtimes.cpython.trampoline import FUNCTIONS, LIBC_FUNCTIONS
from micropatch.runtimes.cpython.versions import Layout, describe_supported, layout_for

_INTERPRETER_NAME = re.compile(r"(lib)?python3(\.\d+)?(\.so(\.[\d.]+)?|d|m)?$")
_LIBC_NAME = re.compile(r"(libc\.so\.6|libc\.musl.*|ld-musl.*)$")
MAX_THREADS = 100_000


@dataclass(frozen=True)
class ThreadState:
    address: int
    thread_id: int  # pthread_self() of the thread
    native_id: int  # its kernel thread id, as this process sees it (0: not a thread of it)


@dataclass
class Interpreter:
    """A process's CPython: where it is, which release, and how to read it."""

    pid: int
    image: LoadedImage
    path: str
    hexversion: int
    layout: Layout
    runtime: int  # address of _PyRuntime
    functions: dict[str, int]
    code_ranges: list[tuple[int, int]] = field(default_factory=list)  # its own code

    @property
    def version(self) -> str:
        v = self.hexversion
        return f"{v >> 24}.{(v >> 16) & 0xFF}.{(v >> 8) & 0xFF}"

    @property
    def minor(self) -> str:
        return f"{self.hexversion >> 24}.{(self.hexversion >> 16) & 0xFF}"

    def is_own_code(self, address: int) -> bool:
        """CPython's own code: the interpreter module or its standard extension modules."""
        return any(start <= address < end for start, end in self.code_ranges)

    def pointer(self, memory: Memory, address: int) -> int:
        value: int = struct.unpack("<Q", memory.read(address, 8))[0]
        return value

    def main_interpreter(self, memory: Memory) -> int:
        interp = self.pointer(memory, self.runtime + self.layout.runtime_interp_main)
        if not interp:
            raise InterpreterError(f"process {self.pid}: Python is not initialized (yet)")
        back = self.pointer(memory, interp + self.layout.interp_runtime)
        if back != self.runtime:
            raise InterpreterError(
                f"process {self.pid}: CPython {self.version}'s main interpreter does not point "
                "back at _PyRuntime: its structures are not laid out as micropatch expects; "
                "nothing was changed"
            )
        return interp

    def threads(self, memory: Memory, interp: int) -> list[ThreadState]:
        """The thread states of an interpreter, checked against the process's threads."""
        lay = self.layout
        tasks = _tasks(self.pid)
        found: list[ThreadState] = []
        address = self.pointer(memory, interp + lay.interp_threads_head)
        while address and len(found) < MAX_THREADS:
            if self.pointer(memory, address + lay.tstate_interp) != interp:
                raise InterpreterError(
                    f"process {self.pid}: a thread state of CPython {self.version} does not "
                    "point at its interpreter: unexpected layout; nothing was changed"
                )
            native = self.pointer(memory, address + lay.tstate_native_thread_id)
            thread_id = self.pointer(memory, address + lay.tstate_thread_id)
            found.append(ThreadState(address, thread_id, tasks.get(native, 0)))
            address = self.pointer(memory, address + lay.tstate_next)
        if tasks and found and not any(t.native_id for t in found):
            raise InterpreterError(
                f"process {self.pid}: no thread state of CPython {self.version} names a thread "
                "of the process: unexpected layout; nothing was changed"
            )
        return found

    def main_thread_id(self, memory: Memory) -> int:
        return self.pointer(memory, self.runtime + self.layout.runtime_main_thread)

    def gil_holder(self, memory: Memory, interp: int) -> int | None:
        """The thread state holding the GIL, None if it is free (read in a stop)."""
        lay = self.layout
        if lay.gil_in_runtime is not None:
            base = self.runtime + lay.gil_in_runtime
        else:
            assert lay.interp_gil is not None
            base = self.pointer(memory, interp + lay.interp_gil)
        locked = struct.unpack("<i", memory.read(base + lay.gil_locked, 4))[0]
        return self.pointer(memory, base + lay.gil_last_holder) if locked else None


def _tasks(pid: int) -> dict[int, int]:
    """The process's threads: the id CPython records for each (`gettid()` in the
    process's own PID namespace: a container's) → the id this process sees. Ours when
    the process is in our namespace; else read from each thread's `NSpid` line."""
    try:
        ours = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    if len(_nspid(f"/proc/{pid}/status")) <= 1:
        return {t: t for t in ours}
    tasks = {}
    for t in ours:
        ids = _nspid(f"/proc/{pid}/task/{t}/status")
        if ids:
            tasks[ids[-1]] = t
    return tasks


def _nspid(path: str) -> list[int]:
    """The `NSpid` ids of a status file, ours first, the innermost namespace's last
    ([] if unreadable: a thread that exited)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def find_interpreter(pid: int, mappings: list[Mapping], memory: Memory) -> Interpreter:
    """The CPython interpreter of a process, with its release checked supported;
    InterpreterError saying why not."""
    image, path = _interpreter_image(pid, mappings, memory)
    runtime = image.symbol("_PyRuntime")
    version_at = image.symbol("Py_Version")
    if runtime is None:
        raise InterpreterError(f"process {pid}: {path} exports no _PyRuntime")
    if version_at is None:
        raise InterpreterError(
            f"process {pid}: {path} is a CPython older than 3.11 (no Py_Version); micropatch "
            f"patches CPython {describe_supported()}"
        )
    hexversion = struct.unpack("<Q", memory.read(version_at, 8))[0]
    layout = layout_for(hexversion)
    version = f"{hexversion >> 24}.{(hexversion >> 16) & 0xFF}.{(hexversion >> 8) & 0xFF}"
    if layout is None:
        raise InterpreterError(
            f"process {pid} runs CPython {version} ({path}): micropatch patches CPython "
            f"{describe_supported()}, whose internal structures it has verified; nothing was "
            "changed"
        )
    functions = {}
    for name in FUNCTIONS:
        address = image.symbol(name)
        if address is None:
            raise InterpreterError(f"process {pid}: {path} does not export {name}")
        functions[name] = address
    functions.update(_libc_functions(pid, mappings, memory))
    interpreter = Interpreter(pid, image, path, hexversion, layout, runtime, functions)
    interpreter.code_ranges = _code_ranges(mappings, path, interpreter.minor)
    return interpreter


def _interpreter_image(
    pid: int, mappings: list[Mapping], memory: Memory
) -> tuple[LoadedImage, str]:
    candidates = [m for m in mappings if m.offset == 0 and m.inode and
                  _INTERPRETER_NAME.match(m.name)]  # fmt: skip
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = ""
    candidates += [m for m in mappings if m.offset == 0 and m.file_path == exe]
    for m in candidates:
        image = LoadedImage(memory.read, m.start, m.name)
        try:
            if image.symbol("_PyRuntime") is not None:
                return image, m.file_path
        except (ElfError, MemoryAccessError):
            continue
    raise InterpreterError(
        f"process {pid} is not a CPython interpreter (no mapped python3 executable or "
        "libpython3 exports _PyRuntime)"
    )


def _libc_functions(pid: int, mappings: list[Mapping], memory: Memory) -> dict[str, int]:
    for m in mappings:
        if m.offset != 0 or not m.inode or not _LIBC_NAME.match(m.name):
            continue
        image = LoadedImage(memory.read, m.start, m.name)
        found = {name: image.symbol(name) for name in LIBC_FUNCTIONS}
        if all(found.values()):
            return {name: address for name, address in found.items() if address is not None}
    raise InterpreterError(f"process {pid}: no C library exporting {', '.join(LIBC_FUNCTIONS)}")


def _code_ranges(mappings: list[Mapping], path: str, minor: str) -> list[tuple[int, int]]:
    """Executable mappings of the interpreter and of the standard extension modules
    beside it (`<prefix>/lib/python3.X/lib-dynload/`), as the process names them."""
    directory = os.path.dirname(path)
    prefix = os.path.dirname(directory)  # <prefix>/bin or <prefix>/lib -> <prefix>
    dynload = (
        f"{prefix}/lib/python{minor}/lib-dynload/",
        f"{directory}/python{minor}/lib-dynload/",
    )
    ranges = []
    for m in mappings:
        if not m.executable:
            continue
        own = m.file_path == path or m.file_path.startswith(dynload)
        if own:
            ranges.append((m.start, m.end))
    return ranges
