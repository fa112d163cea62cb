"""The options of the commands that act on running processes, declared once
(see `spec.py`): which processes (--pid, or --all and its filters), how
(--retries, --stop-timeout, --lock-timeout, --watchdog) and with which trust."""

from __future__ import annotations

from micropatch.cli.spec import Option
from micropatch.trust.paths import DEFAULT_TRUST_DIR, TRUST_DIR_VARIABLE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from micropatch.cli.spec import Values

PID = Option("pid", ("--pid", "-p"), "Target process id (repeatable).", kind="int", many=True)
ALL = Option("all_", ("--all",), "Every process this concerns.", kind="flag")
EXE = Option(
    "exe", ("--exe",), "With --all: only processes whose executable path matches this glob.",
    many=True,
)  # fmt: skip
USER = Option(
    "user", ("--user",), "With --all: only processes of this user (name or uid).", many=True
)
UNIT = Option(
    "unit", ("--unit",),
    "With --all: only processes in this systemd unit (glob; `nginx` = nginx.service).",
    many=True,
)  # fmt: skip
CGROUP = Option(
    "cgroup", ("--cgroup",), "With --all: only processes whose cgroup path matches.", many=True
)
DRY_RUN = Option(
    "dry_run", ("--dry-run",), "With --all: list the processes it would touch, and touch none.",
    kind="flag",
)  # fmt: skip
RETRIES = Option(
    "retries", ("--retries",),
    "How often to retry when a thread is executing code being changed, or does not stop "
    "within --stop-timeout (default 20).",
    kind="int",
)  # fmt: skip
STOP_TIMEOUT = Option(
    "stop_timeout", ("--stop-timeout",),
    "How long every thread may take to stop before the attempt is abandoned (untouched) "
    "and retried within --retries (default 2).",
    kind="float", minimum=0.001, metavar="SECONDS",
)  # fmt: skip
LOCK_TIMEOUT = Option(
    "lock_timeout", ("--lock-timeout",),
    "Seconds to wait for another micropatch operation on the same process (default 30).",
    kind="float", minimum=0,
)  # fmt: skip
TIMEOUT = Option(
    "timeout", ("--timeout",),
    "CPython patches: how long the interpreter may take to reach a point where Python code "
    "may run before the operation is cancelled, untouched (default 5).",
    kind="float", minimum=0.01, metavar="SECONDS",
)  # fmt: skip
WATCHDOG = Option(
    "watchdog", ("--watchdog",),
    "How long a stop may hold a process beyond --stop-timeout before a watchdog kills "
    "this command so that the process runs again; the next command completes or rolls "
    "back what it left (default 3).",
    kind="float", minimum=0.01, metavar="SECONDS",
)  # fmt: skip
TRUST = Option(
    "trust", ("--trust",),
    "Trusted public key file (.pub) or directory of them (repeatable). "
    f"Default: the *.pub files in ${TRUST_DIR_VARIABLE} ({DEFAULT_TRUST_DIR}).",
    kind="path", many=True,
)  # fmt: skip
ALLOW_UNSIGNED = Option(
    "allow_unsigned", ("--allow-unsigned",),
    "Development only: accept a TOML source, or an artifact without signatures.",
    kind="flag",
)  # fmt: skip

SELECT = (PID, ALL, EXE, USER, UNIT, CGROUP, DRY_RUN)
TUNING = (RETRIES, LOCK_TIMEOUT, STOP_TIMEOUT, WATCHDOG, TIMEOUT)


class Scope:
    """The processes a command names (`pids`), or the filters of --all (`filters`,
    by kind: exe, user, unit, cgroup), checked; `dry_run` with --all only."""

    __slots__ = ("dry_run", "filters", "pids")

    def __init__(self, values: Values) -> None:
        pids, all_ = values["pid"], values["all_"]
        if bool(pids) == all_:
            raise ValueError("name the processes with --pid PID (repeatable), or use --all")
        given = {kind: values[kind] for kind in ("exe", "user", "unit", "cgroup")}
        if not all_ and (any(given.values()) or values["dry_run"]):
            raise ValueError(
                "--exe, --user, --unit, --cgroup and --dry-run choose among --all; "
                "use them with --all instead of --pid"
            )
        self.pids: list[int] = list(pids)
        self.filters: dict[str, list[str]] | None = given if all_ else None
        self.dry_run: bool = values["dry_run"]


def tuning(values: Values) -> dict[str, float]:
    """The engine's keyword arguments for the options given; its defaults for the others."""
    given = {
        "retries": values["retries"],
        "stop_timeout": values["stop_timeout"],
        "timeout": values.get("timeout"),
    }
    return {name: value for name, value in given.items() if value is not None}
