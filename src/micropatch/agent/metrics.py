"""The agent's Prometheus metrics, served on 127.0.0.1 only when asked for.

Every metric lives in a `CollectorRegistry` owned by the `Metrics` object (not
prometheus_client's global one), so two agents in one test process, or an
agent restarted in-process, never share or collide. The endpoint binds to the
loopback address only: the metrics name executables and patches, which is
nobody else's business; a scraper on another host goes through a proxy the
operator sets up.

Names (docs/agent.md, "Metrics"):

========================================  =========  =====================
micropatch_patches{state}                 gauge      patches in the store by state
micropatch_processes_covered              gauge      processes carrying a patch
micropatch_blocked_total{patch}           counter    exploit attempts blocked
micropatch_failures_total{patch}          counter    failed applies/removes
micropatch_crashes_total{patch}           counter    crashes of processes carrying the patch
micropatch_auto_disabled_total{patch}     counter    crash auto-disables
micropatch_exec_latency_seconds           histogram  time an exec was held
micropatch_late_starts_total              counter    processes patched late (live)
micropatch_missed_starts_total            counter    ... that ran unpatched anyway
micropatch_events_total{kind}             counter    events by kind
process_*                                 (agent's own CPU, RSS, fds)
========================================  =========  =====================
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

ADDRESS = "127.0.0.1"

# Exec latency added by the agent: the aim is <= 2 ms unrelated, <= 10 ms patched,
# and the watchdog allows anything held longer than hold_limit (50 ms by default).
EXEC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)

PATCH_STATES = ("enabled", "disabled")


class _EventLike(Protocol):
    """What `Metrics.record` reads of an agent Event (agent/events.py)."""

    @property
    def kind(self) -> str: ...
    @property
    def patch_id(self) -> str | None: ...
    @property
    def data(self) -> dict[str, object]: ...


class _Refresh:
    """Calls `Metrics.update(snapshot())` when scraped, before the gauges are read.

    Registered first: the registry collects in registration order. Emits nothing.
    """

    def __init__(self, metrics: Metrics, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self._metrics = metrics
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            self._metrics.update(self._snapshot())
        except Exception:  # a scrape never fails because status did
            log.exception("metrics: reading the agent's status failed")
        return []


class Metrics:
    """The agent's metrics; `record` is an EventSink, `start` opens the endpoint.

    ``snapshot``, if given, is called on every scrape (the agent's
    ``snapshot()``: ``{"patches": [{"state": ...}, ...], "processes": [...]}``)
    to refresh the gauges; otherwise the agent calls `update` or the setters.
    """

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if snapshot is not None:
            r.register(_Refresh(self, snapshot))
        self.patches = Gauge(
            "micropatch_patches", "Patches in the store, by state.", ["state"], registry=r
        )
        self.processes_covered = Gauge(
            "micropatch_processes_covered",
            "Running processes that carry at least one patch.",
            registry=r,
        )
        self.blocked_total = Counter(
            "micropatch_blocked",
            "Exploit attempts blocked by a patch (counter increments read from the caves).",
            ["patch"],
            registry=r,
        )
        self.failures_total = Counter(
            "micropatch_failures",
            "Failed attempts to apply, remove or update a patch in a process.",
            ["patch"],
            registry=r,
        )
        self.crashes_total = Counter(
            "micropatch_crashes",
            "Crashes (SIGSEGV, SIGBUS, SIGILL, SIGABRT, SIGTRAP) of processes carrying a "
            "patch, forked children included, per patch carried.",
            ["patch"],
            registry=r,
        )
        self.auto_disabled_total = Counter(
            "micropatch_auto_disabled",
            "Patches disabled for an executable automatically after too many crashes.",
            ["patch"],
            registry=r,
        )
        self.exec_latency_seconds = Histogram(
            "micropatch_exec_latency_seconds",
            "Time the agent held an exec (permission event to allow), patched or not.",
            buckets=EXEC_BUCKETS,
            registry=r,
        )
        self.events_total = Counter(
            "micropatch_events", "Agent events, by kind.", ["kind"], registry=r
        )
        self.late_starts_total = Counter(
            "micropatch_late_starts",
            "Processes patched live after mapping a patched module by a route the agent "
            "could not hold (released by the watchdog, opened before it was watched).",
            registry=r,
        )
        self.missed_starts_total = Counter(
            "micropatch_missed_starts",
            "Processes that took such a route and ran unpatched (exited first, or failed).",
            registry=r,
        )
        ProcessCollector(registry=r)  # the agent's own CPU and RSS: process_*
        for state in PATCH_STATES:
            self.patches.labels(state)  # present at 0 before the first update
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- updates ------------------------------------------------------------

    def set_patches(self, counts: Mapping[str, int]) -> None:
        """Patches in the store by state, e.g. ``{"enabled": 3, "disabled": 1}``."""
        for state in {*PATCH_STATES, *counts}:
            self.patches.labels(state).set(counts.get(state, 0))

    def update(self, snapshot: Mapping[str, Any]) -> None:
        """Gauges from the agent's status: patches by state, processes covered."""
        patches = snapshot.get("patches")
        if isinstance(patches, list):
            counts: dict[str, int] = {}
            for patch in patches:
                if isinstance(patch, Mapping):
                    state = str(patch.get("state", "unknown"))
                    counts[state] = counts.get(state, 0) + 1
            self.set_patches(counts)
        processes = snapshot.get("processes")
        if isinstance(processes, list | dict):
            self.set_covered(len(processes))

    def set_covered(self, processes: int) -> None:
        self.processes_covered.set(processes)

    def exec_held(self, seconds: float) -> None:
        """One exec (or library open) held for this long before it was allowed."""
        self.exec_latency_seconds.observe(seconds)

    def record(self, event: _EventLike) -> None:
        """Count one agent event (an EventSink; thread-safe).

        ``blocked``: adds ``data["count"]`` (the increment since the last report,
        default 1) to the patch's counter; ``failed``: a failure of the patch;
        ``crashed``: a crash of a process carrying the patch; ``late``: a late start
        (``data["outcome"]``: patched or missed); ``disabled`` with ``data["auto"]``
        true (or ``data["reason"] == "crashes"``): an auto-disable.
        """
        self.events_total.labels(event.kind).inc()
        patch = event.patch_id or ""
        if event.kind == "blocked":
            count = event.data.get("count", 1)
            if isinstance(count, int) and count > 0:
                self.blocked_total.labels(patch).inc(count)
        elif event.kind == "failed":
            self.failures_total.labels(patch).inc()
        elif event.kind == "crashed":
            self.crashes_total.labels(patch).inc()
        elif event.kind == "late":
            late = event.data.get("outcome") == "patched"
            (self.late_starts_total if late else self.missed_starts_total).inc()
        elif event.kind == "disabled" and (
            event.data.get("auto") or event.data.get("reason") == "crashes"
        ):
            self.auto_disabled_total.labels(patch).inc()

    # -- endpoint -----------------------------------------------------------

    def start(self, port: int, address: str = ADDRESS) -> int:
        """Serve /metrics on address:port (0: any free port); returns the port.

        Only a loopback address is accepted (127.0.0.0/8, ::1): anything else
        is a ValueError."""
        if self._server is not None:
            raise RuntimeError(f"the metrics endpoint already runs on port {self.port}")
        try:
            loopback = ipaddress.ip_address(address).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"metrics_address {address!r} is not a loopback address: the endpoint "
                "serves on 127.0.0.1 (or ::1) only; put a proxy in front to expose it"
            )
        try:
            server, thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:
            e.add_note(f"metrics endpoint on {address}:{port}: is the port taken?")
            raise
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", address, self.port)
        return self.port

    def stop(self) -> None:
        """Close the endpoint (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._thread = None
        self.port = None
