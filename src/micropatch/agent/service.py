"""The Agent: store, policy, events, running processes and the control socket,
composed; threads; sd_notify; and where the other parts plug in.

Threads: the main thread waits for SIGTERM/SIGINT; the worker reconciles
(at start, on every change, every `rescan_interval`) and reads blocked
counters and the store directory every `blocked_interval`, a pass running its
processes `workers` at a time; the control server answers each connection in a
thread of its own. Every operation on a process takes one of `workers` slots of
`ops`, so the agent never has more than that of its own on the host at once
(the per-process lock of live/lock.py orders each against the CLI).

Plug points for the parts built beside this one (one line each):
- new processes (agent/newproc.py): `_plug_new_processes` attaches a
  `NewProcesses(agent, agent.report, modules=agent.modules, hold_limit=...)`;
  the Agent is its `Catalog` (`wanted`, `watched`, `changed`), and
  `on_change(newproc.wake)` makes its index look for the targets on every
  policy/store change.
- crashes (agent/crashes.py, process/connector.py): `_plug_crashes` sets
  `agent.crash_tracker` and attaches the exit watcher, which calls
  `agent.on_exit(pid, exit_signal)` for every process exit.
- metrics (agent/metrics.py): `_plug_metrics` attaches it; `add_sink` gives
  it every event, `snapshot()` the gauges.
- the fleet (agent/fleet/): `Fleet(agent)` is attached in `__init__`; its
  thread checks in once enrolled (`enroll`), applies the server's policy
  through `state` and `add`'s path, and `drop`s revoked patches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from micropatch.agent.config import AgentConfig
from micropatch.agent.coverage import indexable
from micropatch.agent.crashes import CrashTracker, ExitThread
from micropatch.agent.db import Database
from micropatch.agent.events import Event, EventLog, EventSink
from micropatch.agent.exits import Exits
from micropatch.agent.paths import AgentPaths
from micropatch.agent.policy import PolicyView, matches, wants
from micropatch.agent.reconcile import PassResult, Reconciler
from micropatch.agent.requests import Requests
from micropatch.agent.store import ArtifactStore, PolicyState
from micropatch.errors import FanotifyUnavailable, MicropatchError
from micropatch.live.mapped import LoadedModule, ModuleCache, ModuleFile
from micropatch.patch.view import TargetView
from micropatch.process.connector import ConnectorError
from micropatch.process.select import ProcessInfo
from micropatch.trust.admission import Admitted

if TYPE_CHECKING:
    from micropatch.agent.metrics import Metrics
    from micropatch.build.plan import ExternalResolver, ModulePlan

log = logging.getLogger(__name__)

INDEX_WAIT = 300.0  # seconds READY waits for the first walk of the module index


class Part(Protocol):
    """Something the agent starts after its store is loaded and stops first."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class _Stoppable(Protocol):
    def stop(self) -> None: ...


class _Started:
    """A part already started when plugged (to fail early); the agent only stops it."""

    def __init__(self, part: _Stoppable) -> None:
        self.part = part

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.part.stop()


class SharedModuleCache(ModuleCache):
    """The agent's one ModuleCache, shared by its threads (reconcile, the socket's
    operations, new processes): one lookup at a time. A file is hashed and parsed
    once per version, so the lock is held long only the first time a file is seen."""

    def __init__(self, max_entries: int = 8) -> None:
        super().__init__(max_entries)
        self._lock = threading.Lock()

    def get(self, file: BinaryIO) -> ModuleFile:
        with self._lock:
            return super().get(file)

    def plan(
        self, admitted: Admitted, module: LoadedModule, external: ExternalResolver
    ) -> ModulePlan:
        with self._lock:
            return super().plan(admitted, module, external)


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) how we are: a datagram to $NOTIFY_SOCKET. False
    when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify %s: %s", state, e)
        return False
    return True


class Agent(Exits, Requests):
    """The host agent. `run()` in the foreground, or `start()` / `stop()`."""

    def __init__(self, config: AgentConfig, paths: AgentPaths, *, stream: Any = None) -> None:
        self.config = config
        self.paths = paths
        paths.create()
        self.db = Database(paths.database)
        self.events = EventLog(self.db, stream)
        self.report: EventSink = self.events.record
        self.store = ArtifactStore(paths, self.report)
        self.state = PolicyState(self.db)
        self.modules = SharedModuleCache(config.max_modules)  # the one cache of the agent
        # At most `workers` operations of the agent's on the host at once (passes, the
        # socket's); live/lock.py still orders each process's against the CLI's.
        self.ops = threading.BoundedSemaphore(config.worker_count())
        self.reconciler = Reconciler(
            self.store, self.state, self.report, modules=self.modules, ops=self.ops,
            lock_timeout=config.lock_timeout, workers=config.worker_count(),
        )  # fmt: skip
        self.events.add_sink(self.reconciler.note)
        self.crash_tracker: CrashTracker | None = None  # set by _plug_crashes
        self.metrics: Metrics | None = None  # set by _plug_metrics
        self.new_processes: Any = None  # NEWPROC's NewProcesses, when plugged (its stats)
        self.started = time.time()
        self.ready = threading.Event()
        self.generation = 0
        self.passes = 0  # full passes over the running processes completed
        self._pass_done = threading.Condition()  # notified at the end of every pass
        self._begun = 0  # passes begun
        self._last_pass: PassResult | None = None
        self._changed = threading.Event()
        self._change_callbacks: list[Callable[[], None]] = []
        self._parts: list[Part] = []
        self._view: PolicyView | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        from micropatch.agent.control import ControlServer

        self.control = ControlServer(self, paths.socket, read_only_group=config.read_only_group)
        from micropatch.agent.fleet import Fleet

        self.fleet = Fleet(self)
        self.attach(self.fleet)

    # --- Catalog (what NEWPROC asks) ----------------------------------------------

    def wanted(self, info: ProcessInfo, module: Any) -> list[Admitted]:
        """Enabled, non-excluded admitted patches whose target identity is this module
        file, for this process. `module`: anything with `.identity` (a ModuleFile),
        or an identity itself (`build_id`, `sha256`). Each is re-verified against
        the keys trusted now before it is returned (the check before each apply)."""
        identity = getattr(module, "identity", module)
        view = self.view()
        found = []
        for stored in self.store.patches().values():
            if not matches(stored.admitted.patch.target, identity):
                continue
            if not wants(stored.id, info, view):
                continue
            try:
                found.append(self.store.recheck(stored.id))
            except MicropatchError:
                continue  # rejected, with its event
        return found

    def watched(self) -> list[TargetView]:
        """The targets of every enabled patch (NEWPROC indexes and marks their copies),
        each with the build-id its artifact was built against when the source pins
        only the SHA-256 (the index's cheap key: the same bytes, the same build-id)."""
        view = self.view()
        return [indexable(s) for s in self.store.patches().values() if view.enabled(s.id)]

    def changed(self) -> threading.Event:
        """Set on every policy or store change (`generation` counts them); the reader
        clears it. Callbacks given to `on_change` are called as well."""
        return self._changed

    def view(self) -> PolicyView:
        """The policy now (cached until the next change)."""
        with self._lock:
            if self._view is None:
                self._view = self.state.view()
            return self._view

    # --- plug points ------------------------------------------------------------

    def attach(self, part: Part) -> None:
        """Start `part` with the agent (after the store is loaded), stop it first."""
        self._parts.append(part)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` (quickly; from the thread that made the change) after
        every policy or store change."""
        self._change_callbacks.append(callback)

    def add_sink(self, sink: EventSink) -> None:
        """Give `sink` every event from now on (metrics, crash bookkeeping)."""
        self.events.add_sink(sink)

    def _plug_new_processes(self) -> None:
        """New processes patched at their exec and libraries at their load, before any
        of their code runs (agent/newproc.py), unless config.new_processes is off.
        Without fanotify permission events the agent runs on: new processes are then
        patched by the next pass over running processes, and an event says so."""
        if not self.config.new_processes:
            return
        from micropatch.agent.newproc import NewProcesses

        def held(seconds: float) -> None:
            if self.metrics is not None:
                self.metrics.exec_held(seconds)

        new = NewProcesses(
            self, self.report, modules=self.modules, hold_limit=self.config.hold_limit,
            on_hold=held, filesystems=self.config.filesystems,
            library_dirs=self.config.library_dirs,
        )  # fmt: skip
        if self._plug(new, FanotifyUnavailable, "new processes are patched only by the pass"):
            self.new_processes = new
            self.on_change(new.wake)

    def _plug_crashes(self) -> None:
        """Crash auto-disable: count crashes per (patch, executable), fed by the proc
        connector's exit events (process/connector.py). Without the connector (an
        old kernel, a container) the agent runs on without it, and says so."""
        self.crash_tracker = CrashTracker(self.config.crash_limit, self.config.crash_window)
        lineage = self.reconciler
        exits = ExitThread(
            on_exit=lambda ev: self.on_exit(ev.pid, ev.signal, ev.timestamp_ns),
            on_overrun=self.wake,
            on_fork=lambda ev: lineage.forked(ev.parent_tgid, ev.child_pid, ev.timestamp_ns),
            on_exec=lambda ev: lineage.execed(ev.tgid, ev.timestamp_ns),
        )  # fmt: skip
        self._plug(exits, ConnectorError, "crash auto-disable is off")

    def _plug(self, part: Part, unavailable: type[Exception], consequence: str) -> bool:
        """Start a part now, so that a kernel feature missing shows at start; without
        it the agent runs on, and says so in an event."""
        try:
            part.start()
        except unavailable as e:
            self.report(Event("agent", time.time(), pid=os.getpid(), message=f"{consequence}: {e}"))
            return False
        self._parts.append(_Started(part))
        return True

    def _check_realtime(self) -> None:
        """The engine's stop window and the hold of new processes run at SCHED_FIFO
        (process/priority.py); without it they still work, slower under load: said
        once, at start, rather than silently."""
        from micropatch.process.priority import realtime_refused

        refused = realtime_refused()
        if refused is not None:
            self.report(Event(
                "agent", time.time(), pid=os.getpid(), data={"realtime": refused},
                message=f"cannot run at real-time priority (SCHED_FIFO: {refused}): on a "
                "loaded machine stop windows and held execs will wait for a CPU; give the "
                "agent CAP_SYS_NICE and no RestrictRealtime (as `agent install` does)",
            ))  # fmt: skip

    def _plug_metrics(self) -> None:
        """The Prometheus endpoint, only when config.metrics_port is set."""
        if self.config.metrics_port is None:
            return
        from micropatch.agent.metrics import Metrics

        metrics = Metrics(snapshot=self.snapshot)
        self.metrics = metrics
        self.add_sink(metrics.record)
        port = metrics.start(self.config.metrics_port, self.config.metrics_address)
        self.report(Event(
            "agent", time.time(), pid=os.getpid(),
            message=f"metrics on http://{self.config.metrics_address}:{port}/metrics",
            data={"metrics_port": port},
        ))  # fmt: skip
        self._parts.append(_Started(metrics))

    # --- life -----------------------------------------------------------------

    def start(self) -> None:
        """Load the store, listen, start the parts and the worker (which makes the
        first pass, then says READY)."""
        self._check_realtime()
        self._sync_store()
        self.control.start()
        self._plug_metrics()
        self._plug_crashes()
        self._plug_new_processes()
        for part in self._parts:
            part.start()
        self._worker = threading.Thread(target=self._work, name="reconcile", daemon=True)
        self._worker.start()

    def run(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT: processes stay patched (the
        registries in them remember), and a restarted agent picks up from there."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.wake())
        self.start()
        try:
            while not self._stopping.wait(3600):
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        self._stopping.set()
        sd_notify("STOPPING=1")
        self.report(Event("agent", time.time(), pid=os.getpid(), message="stopping"))
        self._wake.set()
        self.control.stop()
        for part in reversed(self._parts):
            try:
                part.stop()
            except Exception:
                log.exception("stopping %r", part)
        if self._worker is not None:
            self._worker.join(timeout=60)
        self.events.close()

    def wake(self) -> None:
        """Reconcile every running process soon (a change, SIGHUP, `rescan`)."""
        self._wake.set()

    def _work(self) -> None:
        try:
            self._pass(None)
            if self.new_processes is not None:  # units ordered after us start held
                self.new_processes.indexer.ready.wait(INDEX_WAIT)
        except Exception:
            log.exception("first pass")  # the agent still serves, and the next pass retries
        finally:
            self.ready.set()
        self.report(Event(
            "agent", time.time(), pid=os.getpid(),
            message=f"ready: {len(self.store.patches())} patches, "
            f"{len(self.reconciler.covered())} processes covered",
        ))  # fmt: skip
        patches = len(self.store.patches())
        sd_notify(f"READY=1\nSTATUS=watching {patches} patches\nMAINPID={os.getpid()}")
        last_full = time.monotonic()
        while not self._stopping.is_set():
            woke = self._wake.wait(self.config.blocked_interval)
            if self._stopping.is_set():
                break
            try:
                if self._sync_store():
                    woke = True
                due = time.monotonic() - last_full >= self.config.rescan_interval
                if woke or due:
                    self._wake.clear()
                    self._pass(None)
                    last_full = time.monotonic()
                else:
                    self.reconciler.poll_blocked()
            except Exception:
                log.exception("reconcile loop")

    def _pass(self, pids: Iterable[int] | None) -> None:
        started = time.monotonic()
        with self._pass_done:
            self._begun += 1
            result = PassResult(number=self._begun)
        try:
            result = self.reconciler.run_pass(pids, result.number)
            self.reconciler.poll_blocked()
        finally:
            with self._pass_done:
                self.passes += 1
                self._last_pass = result
                self._pass_done.notify_all()
        log.info("pass over %d processes in %.3f s: %s", result.seen,
                 time.monotonic() - started, result)  # fmt: skip

    def passes_begun(self) -> int:
        with self._pass_done:
            return self._begun

    def await_pass(self, after: int, deadline: float) -> PassResult | None:
        """The result of the first pass begun after pass number `after` (so it saw
        every change made before `passes_begun()` returned `after`), once it is done;
        None if none is done by `deadline` (monotonic)."""
        with self._pass_done:
            done = self._pass_done.wait_for(
                lambda: self._last_pass is not None and self._last_pass.number > after,
                timeout=max(0.0, deadline - time.monotonic()),
            )  # fmt: skip
            return self._last_pass if done else None

    def _sync_store(self) -> bool:
        if not self.store.sync():
            return False
        for patch_id in [*self.store.patches(), *self.store.python_patches()]:
            self.state.ensure(patch_id, self.config.default_state)
        self._policy_changed(wake=False)
        return True

    def _policy_changed(self, *, wake: bool = True) -> None:
        with self._lock:
            self._view = None
            self.generation += 1
        self._changed.set()
        for callback in list(self._change_callbacks):
            try:
                callback()
            except Exception:
                log.exception("change callback %r", callback)
        if wake:
            self.wake()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()
