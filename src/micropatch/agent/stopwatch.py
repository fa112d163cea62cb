"""The agent's stop watchdog: a frozen agent does not freeze the processes it patches.

The agent's stops run in its own threads (ptrace requests come from the tracing
thread, and the agent's workers trace a new process from its exec to its
detach), so a stop cannot be moved into a child process, and nothing inside a
frozen agent can end one. `micropatch agent run` starts the supervisor of
process/watchdog.py for its process (an Agent used in another process, a
test's, starts none): a stop held longer than its stop timeout plus `stop_limit` gets the agent
SIGKILLed; the kernel lets the stopped threads go at once, and systemd restarts
the agent (Restart=on-failure), whose first pass repairs what the stop left
(agent/reconcile.py). Before the kill the supervisor writes what it ended to
`watchdog.json` in the state directory; the next agent reports it as one
`watchdog` event and forgets it. (Not the hold watchdog of agent/holds.py, which
lets a held exec or open go.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from micropatch.agent.events import Event, EventSink
from micropatch.process.watchdog import Watchdog, previous

log = logging.getLogger(__name__)

RECORD = "watchdog.json"


class StopWatch:
    """Starts the agent's stop watchdog, and reports the previous agent's end by it."""

    def __init__(self, limit: float, state_dir: Path, report: EventSink) -> None:
        self.limit = limit
        self.record = state_dir / RECORD
        self.report = report
        self._dog: Watchdog | None = None

    def start(self) -> None:
        said = previous(self.record)
        if said is not None:
            held, limit = float(str(said.get("held") or 0)), float(str(said.get("limit") or 0))
            message = (
                f"the previous agent (pid {said.get('patcher')}) was killed by its stop "
                f"watchdog: {said.get('what')} held its threads {held:.1f} s (limit {limit:g} s);"
                " they ran again at once, and this agent's first pass repairs what it left"
            )
            log.warning("%s", message)
            pid = said.get("pid")
            self.report(Event(
                "watchdog", float(str(said.get("time") or time.time())),
                pid=pid if isinstance(pid, int) else None, message=message,
                data={"held": held, "limit": limit, "patcher": said.get("patcher")},
            ))  # fmt: skip
        try:
            self._dog = Watchdog.start(self.limit, record=self.record)
        except OSError as e:
            self.report(Event(
                "agent", time.time(), message=f"stop watchdog not started ({e}): a stop held "
                "by a frozen agent is not ended; restart the agent to try again",
            ))  # fmt: skip

    def stop(self) -> None:
        if self._dog is not None:
            self._dog.close()
            self._dog = None
