"""/api/v1/hosts: enrolled hosts, a page at a time; one host, its effective policy;
moving a host to another group, forgetting one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from micropatch.server import schemas as s
from micropatch.server.api import PREFIX
from micropatch.server.api.deps import Administrator, Anyone, HostId, Reader, ServerDep, host_access
from micropatch.server.checkin import host_modules
from micropatch.server.fleet import groups, hosts

router = APIRouter(prefix=PREFIX, tags=["hosts"])


@router.get("/hosts", response_model=list[s.HostOut])
def list_hosts(
    _who: Reader,
    server: ServerDep,
    response: Response,
    group: str | None = None,
    offset: Annotated[int, Query(ge=0, le=s.INT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[s.HostOut]:
    """Hosts by id, a page at a time (`offset`, `limit`); the header X-Total-Count
    says how many there are."""
    with server.database.reading() as session:
        group_id = None if group is None else groups.group(session, group).id
        rows, total = hosts.hosts_out(session, group_id=group_id, offset=offset, limit=limit)
    response.headers["X-Total-Count"] = str(total)
    return rows


@router.get("/hosts/{host_id}", response_model=s.HostOut)
def get_host(host_id: HostId, who: Anyone, server: ServerDep) -> s.HostOut:
    host_access(who, host_id)
    with server.database.reading() as session:
        return hosts.host_out(session, hosts.host(session, host_id), detail=True)


@router.get("/hosts/{host_id}/policy", response_model=s.HostPolicyOut)
def get_host_policy(host_id: HostId, who: Anyone, server: ServerDep) -> s.HostPolicyOut:
    """The host's effective policy: each relevant patch's state and which group
    decided it."""
    host_access(who, host_id)
    with server.database.reading() as session:
        host = hosts.host(session, host_id)
        effective, relevant, _ = hosts.host_policy(
            server.catalogues.current(session), host.group_id, host_modules(session, host.id)
        )
    return s.HostPolicyOut(
        host_id=host.id,
        effective=groups.policy_out(effective, [r.patch_id for r in relevant]),
        patches=relevant,
    )


@router.put("/hosts/{host_id}/group", response_model=s.HostOut)
def move_host(
    host_id: HostId, body: s.HostGroupIn, who: Administrator, server: ServerDep
) -> s.HostOut:
    with server.database.session() as session:
        host = hosts.host(session, host_id)
        hosts.move_host(session, host, body.group, who.actor)
        return hosts.host_out(session, host)


@router.delete("/hosts/{host_id}", status_code=204)
def delete_host(host_id: HostId, who: Administrator, server: ServerDep) -> None:
    """Forget a host (decommissioned, or its credential leaked): its credential stops
    working; it must enroll again with a new token."""
    with server.database.session() as session:
        hosts.delete_host(session, hosts.host(session, host_id), who.actor)
