"""The agent's metrics endpoint (agent/metrics.py): a real HTTP server, scraped."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from micropatch.agent.metrics import Metrics


@dataclass(frozen=True)
class _Event:
    kind: str
    patch_id: str | None = None
    data: dict[str, object] = field(default_factory=dict)


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.stop()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_scraped_names_and_values(metrics: Metrics) -> None:
    port = metrics.start(0)
    metrics.set_patches({"enabled": 3, "disabled": 1})
    metrics.set_covered(42)
    metrics.record(_Event("blocked", "fix-a", {"count": 3}))
    metrics.record(_Event("blocked", "fix-a", {"count": 2}))
    metrics.record(_Event("failed", "fix-b"))
    metrics.record(_Event("crashed", "fix-a", {"signal": 11, "patches": ["fix-a", "fix-b"]}))
    metrics.record(_Event("crashed", "fix-b", {"signal": 11, "patches": ["fix-a", "fix-b"]}))
    metrics.record(_Event("crashed", "fix-a", {"signal": 6, "patches": ["fix-a"]}))
    metrics.record(_Event("disabled", "fix-a", {"auto": True}))
    metrics.record(_Event("disabled", "fix-b"))  # by hand: not an auto-disable
    metrics.record(_Event("applied", "fix-a"))
    for seconds in (0.0004, 0.0015, 0.003, 0.2):
        metrics.exec_held(seconds)

    s = _scrape(port)
    assert s[("micropatch_patches", (("state", "enabled"),))] == 3
    assert s[("micropatch_patches", (("state", "disabled"),))] == 1
    assert s[("micropatch_processes_covered", ())] == 42
    assert s[("micropatch_blocked_total", (("patch", "fix-a"),))] == 5
    assert s[("micropatch_failures_total", (("patch", "fix-b"),))] == 1
    assert s[("micropatch_crashes_total", (("patch", "fix-a"),))] == 2
    assert s[("micropatch_crashes_total", (("patch", "fix-b"),))] == 1
    assert s[("micropatch_auto_disabled_total", (("patch", "fix-a"),))] == 1
    assert ("micropatch_auto_disabled_total", (("patch", "fix-b"),)) not in s
    assert s[("micropatch_events_total", (("kind", "blocked"),))] == 2
    assert s[("micropatch_events_total", (("kind", "disabled"),))] == 2
    assert s[("micropatch_events_total", (("kind", "applied"),))] == 1
    assert s[("micropatch_exec_latency_seconds_count", ())] == 4
    assert s[("micropatch_exec_latency_seconds_bucket", (("le", "0.002"),))] == 2
    assert s[("micropatch_exec_latency_seconds_bucket", (("le", "+Inf"),))] == 4
    assert s[("micropatch_exec_latency_seconds_sum", ())] == pytest.approx(0.2049)
    assert s[("process_resident_memory_bytes", ())] > 0


def test_every_metric_is_present_before_any_update(metrics: Metrics) -> None:
    names = {name for name, _ in _scrape(metrics.start(0))}
    assert {
        "micropatch_patches",
        "micropatch_processes_covered",
        "micropatch_exec_latency_seconds_count",
    } <= names


def test_own_registry_not_the_global_one() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on one registry
    a.set_covered(1)
    assert b.registry.get_sample_value("micropatch_processes_covered") == 0
    assert REGISTRY.get_sample_value("micropatch_processes_covered") is None


def _local_addresses() -> set[str]:
    found = set()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: just picks a route
            found.add(probe.getsockname()[0])
    except OSError:
        pass
    with contextlib.suppress(OSError):
        found.update(socket.gethostbyname_ex(socket.gethostname())[2])
    return {a for a in found if not a.startswith("127.")}


def test_bound_to_loopback_only(metrics: Metrics) -> None:
    port = metrics.start(0)
    # The kernel's view: the listening socket's local address is 127.0.0.1.
    listening = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                listening.append(local.split(":")[0])
    assert listening == ["0100007F"]
    for address in _local_addresses():
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
            pass


def test_stop_closes_the_port_and_start_twice_is_refused(metrics: Metrics) -> None:
    port = metrics.start(0)
    with pytest.raises(RuntimeError, match="already runs"):
        metrics.start(0)
    metrics.stop()
    metrics.stop()  # idempotent
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_a_taken_port_says_so(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as info:
            metrics.start(port)
    assert any("is the port taken" in note for note in info.value.__notes__)


def test_a_snapshot_refreshes_the_gauges_at_each_scrape() -> None:
    status = {
        "patches": [{"state": "enabled"}, {"state": "enabled"}, {"state": "disabled"}],
        "processes": [{"pid": 1}, {"pid": 2}],
    }
    metrics = Metrics(lambda: status)
    try:
        port = metrics.start(0)
        s = _scrape(port)
        assert s[("micropatch_patches", (("state", "enabled"),))] == 2
        assert s[("micropatch_processes_covered", ())] == 2
        status["patches"] = [{"state": "disabled"}]
        status["processes"] = []
        s = _scrape(port)
        assert s[("micropatch_patches", (("state", "enabled"),))] == 0
        assert s[("micropatch_patches", (("state", "disabled"),))] == 1
        assert s[("micropatch_processes_covered", ())] == 0
    finally:
        metrics.stop()


def test_a_failing_snapshot_does_not_fail_the_scrape() -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("status broke")

    metrics = Metrics(broken)
    try:
        assert ("micropatch_processes_covered", ()) in _scrape(metrics.start(0))
    finally:
        metrics.stop()


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.1", "localhost"])
def test_only_loopback_addresses(metrics: Metrics, address: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        metrics.start(0, address)
