"""The HTTP API under /api/v1: one router per resource.

Authentication is a bearer secret (`server.auth`). Authorisation:

| who | may |
|---|---|
| admin | everything |
| operator | read; publish and revoke patches; set group policies |
| auditor | read (patches, groups, hosts, events, the audit log) |
| host credential | check in; read its own host, policy and events, nothing else |

Every route runs its database work in one thread, in a transaction of its own
(`Database.session` to write, `Database.reading` to read); authentication, a
dependency, reads in another. Nothing is held from one thread to the next, so no
number of requests at once can leave them waiting for each other.
"""

from __future__ import annotations

from fastapi import APIRouter

PREFIX = "/api/v1"


def routers() -> list[APIRouter]:
    """Every router of the API, in the order the documentation lists them."""
    from micropatch.server.api import agent, enrollment, events, groups, hosts, patches, users

    return [users.router, enrollment.router, agent.router, patches.router, groups.router,
            hosts.router, events.router]  # fmt: skip
