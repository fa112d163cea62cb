"""The agent's configuration: /etc/micropatch/agent.toml, every key optional.

Defaults are what a cautious security team expects:

- `default_state = "enabled"`: a patch added to the agent (`agent add`) has
  passed the admission policy (signed by a key in the trust directory), and
  it protects every matching process at once; the host stays exposed for as
  long as a vetted fix sits disabled. Teams that stage fixes set
  `default_state = "disabled"` (or use `agent add --disabled`) and enable each
  patch explicitly. Either way, crash auto-disable is the safety net.
- Crash auto-disable after 3 crashes of one executable within 600 s.
- Metrics off (`metrics_port` unset); when on, bound to 127.0.0.1 only.
- No read-only group: the control socket is root's alone.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from micropatch.errors import ConfigError
from micropatch.files import read_bounded

MAX_CONFIG = 1 << 20

__all__ = ["AgentConfig", "ConfigError", "default_config_text", "load_config"]


class AgentConfig(BaseModel):
    """Every setting of the agent; the TOML file has the same keys at its top level."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_state: Literal["enabled", "disabled"] = Field(
        default="enabled", description="State of a patch added without --enabled/--disabled."
    )
    crash_limit: int = Field(
        default=3, ge=1, description="Crashes of one executable under a patch that auto-disable it."
    )
    crash_window: float = Field(
        default=600.0, gt=0, description="Seconds within which crash_limit crashes count."
    )
    rescan_interval: float = Field(
        default=60.0, gt=0, description="Seconds between two full scans of the running processes."
    )
    blocked_interval: float = Field(
        default=2.0, gt=0, description="Seconds between two reads of the blocked counters."
    )
    new_processes: bool = Field(
        default=True, description="Patch new processes at exec and library load (fanotify)."
    )
    filesystems: list[str] = Field(
        default_factory=list,
        description="Watch execs on, and index for copies of patched modules, only the "
        "filesystems holding these paths; empty: every local filesystem.",
    )
    library_dirs: list[str] = Field(
        default_factory=list,
        description="Directories indexed for copies of patched modules besides the "
        "watched filesystems (e.g. on a network filesystem, which is not indexed by "
        "default); found at each walk, not kept current by events.",
    )
    hold_limit: float = Field(
        default=0.05, gt=0, description="Seconds an exec or open may be held before it is allowed."
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Prometheus endpoint on metrics_address:PORT; unset: off.",
    )
    metrics_address: str = Field(
        default="127.0.0.1", description="Address of the metrics endpoint (localhost)."
    )
    read_only_group: str | None = Field(
        default=None, description="Group whose members may use the read verbs (status, events)."
    )
    lock_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds to wait for another micropatch operation on one process.",
    )
    checkin_interval: float | None = Field(
        default=None,
        gt=0,
        description="Seconds between two check-ins with the fleet server; unset: the server's.",
    )
    inventory_interval: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between two scans of the modules the processes map (check-in).",
    )
    stop_limit: float = Field(
        default=3.0,
        gt=0,
        description="Seconds a stop of a process may last beyond its stop timeout before "
        "the stop watchdog kills the agent so that the process runs again (systemd "
        "restarts the agent, which repairs what the stop left).",
    )
    max_modules: int = Field(
        default=32, ge=1, description="Parsed module files kept in memory, least recently used out."
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Running processes patched (or unpatched) at once by a pass; "
        "unset: one per CPU the agent may run on, at least 2, at most 8.",
    )

    def worker_count(self) -> int:
        """`workers`, or one per CPU the agent may run on, at least 2, at most 8. A patch
        waits (for the target's threads to stop) less than it computes since the engine
        stays real-time for a whole operation and lays each trampoline out once; more
        workers then mostly contend for the interpreter's lock. Measured, 500 processes
        on 2 loaded CPUs (load 3.4), enable → all patched, 3 rounds each, one after the
        other: 1.96 s median with 2 workers, 2.54 s with 4 (benchmarks/results/
        agent_workers.md). Before those engine changes: 5.0-6.6 s with 2, 2.5 s with 4,
        3.0-3.2 s with 8; 200 processes: 5.3 s with 1, 2.4 s with 2
        (agent_workers1.md, agent_workers2.md). The bound of 8 is not measured on more
        CPUs."""
        import os

        return self.workers or max(2, min(8, len(os.sched_getaffinity(0))))


def load_config(path: str | Path | None, *, missing_ok: bool = True) -> AgentConfig:
    """The configuration in `path`; the defaults when it does not exist (`missing_ok`)."""
    if path is None:
        return AgentConfig()
    path = Path(path)
    try:
        data = read_bounded(path, MAX_CONFIG)
    except FileNotFoundError:
        if missing_ok:
            return AgentConfig()
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    try:
        document = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    try:
        return AgentConfig.model_validate(document)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def default_config_text() -> str:
    """The commented configuration `agent install` writes: every key, at its default."""
    lines = [
        "# micropatch agent configuration (docs/agent.md). Every key is optional;",
        "# the values below are the defaults.",
        "",
    ]
    for name, field in AgentConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"# {field.description}")
        if default is None:
            lines.append(f"# {name} = ")
        elif isinstance(default, bool):
            lines.append(f"{name} = {'true' if default else 'false'}")
        elif isinstance(default, str):
            lines.append(f'{name} = "{default}"')
        elif isinstance(default, list):
            lines.append(f"{name} = {default!r}")
        else:
            lines.append(f"{name} = {default}")
        lines.append("")
    return "\n".join(lines)
