"""When the root metadata of a repository nears its expiry: it is renewed offline
(`micropatch repo sign-root`), so the server and `repo status` only warn."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from micropatch.trust.keys import utc_now

if TYPE_CHECKING:
    from micropatch.server.repository import Repository

# Days before the root expires when the server starts warning.
ROOT_WARNING = 30


def root_expiry_warning(repo: Repository, now: datetime.datetime | None = None) -> str | None:
    """A warning when the root of `repo` expires within `ROOT_WARNING` days (None
    otherwise)."""
    now = now or utc_now()
    root = repo.root().signed
    left = root.expires - now
    if left >= datetime.timedelta(days=ROOT_WARNING):
        return None
    when = "expired" if left <= datetime.timedelta(0) else f"expires in {_days(left)}"
    return (
        f"the root metadata of {repo.dir} (version {root.version}) {when}, on "
        f"{root.expires:%Y-%m-%d %H:%M} UTC: clients stop updating then; sign a new root "
        f"with `micropatch repo sign-root {repo.dir} --root-key ROOT.key …` on the offline "
        'machine (docs/server.md, "Renewing and rotating the root")'
    )


def _days(delta: datetime.timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:.0f} day(s)" if days >= 1 else f"{delta.total_seconds() / 3600:.0f} hour(s)"
