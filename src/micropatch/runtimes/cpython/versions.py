"""The CPython versions micropatch patches, and the layout of the few interpreter
structures it reads and writes in each.

The offsets are those of each version's internal headers (`offsetof()`);
`tests/integration/cpython/test_versions.py` patches each installed release.
CPython changes these private structures
between minor versions and sometimes within one (3.12.x changed
`_pending_calls`), so a layout is only used for the exact releases listed
with it (3.11 kept them through its whole series); every other release is
refused by name. Before any write the reader also checks invariants that a
wrong layout breaks (`runtimes/cpython/interpreter.py`).

3.14 has `sys.remote_exec` (PEP 768): a per-thread request checked at the
eval breaker, which would replace the pending call for busy threads; threads
parked in system calls still need the hijack. Not implemented yet: refused.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = ("3.11", "3.12", "3.13")


def supported(implementation: str, version: str) -> bool:
    return implementation == "cpython" and version in SUPPORTED


@dataclass(frozen=True)
class Layout:
    """Offsets (bytes) into _PyRuntime, PyInterpreterState and PyThreadState."""

    version: str
    releases: tuple[int, ...] | None  # micro versions checked; None: the whole series
    runtime_main_thread: int
    runtime_interp_main: int
    # The GIL: in _PyRuntime (3.11), or behind interp->ceval.gil (3.12+).
    gil_in_runtime: int | None  # offset of the GIL struct's fields' base in _PyRuntime
    interp_gil: int | None  # offset of the pointer to the GIL struct in the interpreter
    gil_last_holder: int
    gil_locked: int
    interp_runtime: int
    interp_threads_head: int
    tstate_next: int
    tstate_interp: int
    tstate_thread_id: int
    tstate_native_thread_id: int
    # The interpreter's pending-call queue (ceval.pending).
    pending_calls: int
    pending_first: int
    pending_last: int  # "last" (3.11, 3.12) or "next" (3.13)
    pending_size: int  # slots in the ring
    pending_call_size: int
    pending_lock: int | None  # PyThread_type_lock (a pointer to a sem_t), 3.11/3.12
    pending_mutex: int | None  # PyMutex (one byte), 3.13
    pending_flag: int | None  # calls_to_do (3.11/3.12)
    pending_count: int | None  # npending (3.13)
    pending_max: int | None  # max (3.13)
    interp_eval_breaker: int | None  # 3.11/3.12: one per interpreter
    tstate_eval_breaker: int | None  # 3.13: one per thread
    calls_bit: int  # the eval breaker bit for pending calls
    main_thread_only: bool  # pending calls run only in the main thread (3.11)
    # Read only (runtimes/cpython/imports.py): sys.modules, and str objects.
    interp_modules: int  # PyInterpreterState.modules (3.12+: .imports.modules)
    ascii_size: int  # sizeof(PyASCIIObject): a compact ASCII str's characters follow


LAYOUTS = {
    "3.11": Layout(
        version="3.11", releases=None,
        runtime_main_thread=80, runtime_interp_main=48,
        gil_in_runtime=368, interp_gil=None, gil_last_holder=0, gil_locked=8,
        interp_runtime=40, interp_threads_head=16,
        tstate_next=8, tstate_interp=16, tstate_thread_id=152, tstate_native_thread_id=160,
        pending_calls=128, pending_first=640, pending_last=644, pending_size=32,
        pending_call_size=16, pending_lock=112, pending_mutex=None, pending_flag=120,
        pending_count=None, pending_max=None, interp_eval_breaker=100,
        tstate_eval_breaker=None, calls_bit=1, main_thread_only=True,
        interp_modules=888, ascii_size=48,
    ),
    "3.12": Layout(
        version="3.12", releases=(1,),
        runtime_main_thread=64, runtime_interp_main=48,
        gil_in_runtime=None, interp_gil=384, gil_last_holder=8, gil_locked=16,
        interp_runtime=96, interp_threads_head=72,
        tstate_next=8, tstate_interp=16, tstate_thread_id=136, tstate_native_thread_id=144,
        pending_calls=424, pending_first=936, pending_last=940, pending_size=32,
        pending_call_size=16, pending_lock=408, pending_mutex=None, pending_flag=416,
        pending_count=None, pending_max=None, interp_eval_breaker=368,
        tstate_eval_breaker=None, calls_bit=1, main_thread_only=False,
        interp_modules=944, ascii_size=40,
    ),
    "3.13": Layout(
        version="3.13", releases=(0,),
        runtime_main_thread=656, runtime_interp_main=640,
        gil_in_runtime=None, interp_gil=16, gil_last_holder=8, gil_locked=16,
        interp_runtime=7376, interp_threads_head=7344,
        tstate_next=8, tstate_interp=16, tstate_thread_id=152, tstate_native_thread_id=160,
        pending_calls=56, pending_first=7256, pending_last=7260, pending_size=300,
        pending_call_size=24, pending_lock=None, pending_mutex=40, pending_flag=None,
        pending_count=44, pending_max=48, interp_eval_breaker=None,
        tstate_eval_breaker=24, calls_bit=1 << 2, main_thread_only=False,
        interp_modules=7656, ascii_size=40,
    ),
}  # fmt: skip


def layout_for(hexversion: int) -> Layout | None:
    """The layout of a release (PY_VERSION_HEX), or None if it was not verified."""
    major, minor, micro = hexversion >> 24, (hexversion >> 16) & 0xFF, (hexversion >> 8) & 0xFF
    layout = LAYOUTS.get(f"{major}.{minor}")
    if layout is None or (layout.releases is not None and micro not in layout.releases):
        return None
    return layout


def describe_supported() -> str:
    parts = []
    for version, layout in LAYOUTS.items():
        micro = "x" if layout.releases is None else "/".join(map(str, layout.releases))
        parts.append(f"{version}.{micro}")
    return ", ".join(parts)
