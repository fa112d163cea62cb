"""`micropatch agent install` / `uninstall`: the systemd unit, the default
configuration and the directories, under a root directory (`/`, or a temporary
one in tests)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from micropatch.agent.paths import (
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_TRUST_DIR,
    UNIT_DIR,
    UNIT_NAME,
)
from micropatch.files import write_atomic
from micropatch.systemd import Installed, entry_point, join, running

__all__ = ["Installed", "entry_point", "install", "systemd_running", "uninstall", "unit_text"]

UNIT_TEMPLATE = """\
# Written by `micropatch agent install`; `micropatch agent uninstall` removes it.
[Unit]
Description=micropatch host agent: keeps every process patched by policy
Documentation=https://github.com/micropatch/micropatch/blob/main/docs/agent.md
# Before every service it protects: a service with the default dependencies starts
# after basic.target, which waits for this agent to say READY (its first pass done),
# so those services start patched. Hence no default dependencies of its own (they
# would order it after basic.target): only what it needs, the local file systems.
DefaultDependencies=no
After=local-fs.target
RequiresMountsFor={mounts}
Before=basic.target
# Stopped at shutdown, after the services it protects (the reverse order).
Conflicts=shutdown.target
Before=shutdown.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
# A stop leaves every process patched: the registries in them remember.
KillMode=mixed
TimeoutStopSec=30
# It must ptrace (CAP_SYS_PTRACE), read /proc/PID/map_files and mark filesystems with
# fanotify (CAP_SYS_ADMIN), read every process's files (CAP_DAC_READ_SEARCH), own its
# socket for a read-only group (CAP_CHOWN), read exits (proc connector, netlink), and
# run at SCHED_FIFO while a target is stopped (CAP_SYS_NICE): on a loaded machine the
# stop window and every held exec wait for a CPU without it.
CapabilityBoundingSet=CAP_SYS_PTRACE CAP_SYS_ADMIN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH
CapabilityBoundingSet=CAP_CHOWN CAP_FOWNER CAP_KILL CAP_SYS_RESOURCE CAP_NET_ADMIN
CapabilityBoundingSet=CAP_SYS_NICE
NoNewPrivileges=yes
# No private mounts (PrivateTmp, ProtectHome, ProtectSystem=strict): fanotify marks
# and the identity of mapped files must see the host's own mount table. No
# RestrictRealtime either: the engine's stop window runs at SCHED_FIFO.
ProtectSystem=full
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6
UMask=0077
OOMScoreAdjust=-500

[Install]
WantedBy=basic.target
"""


def unit_text(
    command: str,
    *,
    state_dir: str = DEFAULT_STATE_DIR,
    socket: str = DEFAULT_SOCKET,
    trust_dir: str = DEFAULT_TRUST_DIR,
    config: str = DEFAULT_CONFIG,
) -> str:
    exec_start = join([
        command, "agent", "run", "--state-dir", state_dir, "--socket", socket,
        "--trust-dir", trust_dir, "--config", config,
    ])  # fmt: skip
    # The state, its configuration and the command itself must be mounted first.
    mounts = join(sorted({state_dir, os.path.dirname(config), os.path.dirname(command)}))
    return UNIT_TEMPLATE.format(exec_start=exec_start, mounts=mounts)


def systemd_running(root: Path) -> bool:
    return root == Path("/") and running()


def install(root: Path = Path("/"), *, command: str | None = None) -> Installed:
    """Write the unit (replacing an older one), the default configuration (only if
    absent), the state and trust directories; reload systemd if it runs."""
    from micropatch.agent.config import default_config_text

    done = Installed()
    unit = _under(root, UNIT_DIR) / UNIT_NAME
    unit.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(unit, unit_text(command or entry_point()), mode=0o644)
    done.written.append(unit)
    config = _under(root, DEFAULT_CONFIG)
    config.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if config.exists():
        done.kept.append(config)
    else:
        write_atomic(config, default_config_text(), mode=0o644)
        done.written.append(config)
    for directory, mode in ((DEFAULT_STATE_DIR, 0o700), (DEFAULT_TRUST_DIR, 0o755)):
        path = _under(root, directory)
        if path.is_dir():
            done.kept.append(path)
        else:
            path.mkdir(mode=mode, parents=True)
            done.written.append(path)
    if systemd_running(root):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        done.notes.append("systemd reloaded; start it with `systemctl enable --now "
                          f"{UNIT_NAME}`")  # fmt: skip
    elif root != Path("/"):
        done.notes.append(f"written under {root}: this host's systemd is left as it was")
    else:
        done.notes.append("systemd is not running here: start the agent with "
                          "`micropatch agent run`")  # fmt: skip
    return done


def uninstall(root: Path = Path("/")) -> Installed:
    """Stop and disable the service if systemd runs, remove the unit. The state
    directory, configuration and trusted keys stay (and the processes stay patched;
    `micropatch remove ID --all` takes patches off)."""
    done = Installed()
    unit = _under(root, UNIT_DIR) / UNIT_NAME
    if systemd_running(root):
        subprocess.run(["systemctl", "disable", "--now", UNIT_NAME], check=False)
    if unit.exists():
        unit.unlink()
        done.written.append(unit)
    if systemd_running(root):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    for kept in (DEFAULT_STATE_DIR, DEFAULT_CONFIG, DEFAULT_TRUST_DIR):
        if _under(root, kept).exists():
            done.kept.append(_under(root, kept))
    return done


def _under(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")
