"""The agent's side of the fleet server (docs/agent.md, "Fleet"): `checkin.Fleet`
(enrollment, the check-in thread), `report` (what is sent), `answer` (the answer
applied as policy), `enrollment` (the host's credential), `server_api` (HTTP)."""

from micropatch.agent.fleet.checkin import Fleet
from micropatch.agent.fleet.server_api import HttpError

__all__ = ["Fleet", "HttpError"]
