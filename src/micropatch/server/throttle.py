"""Failed logins, throttled per user name and per source address.

They are kept in the database (`login_failures`), so every server process
(`--workers N`) counts the same ones, and no flood of made-up names can push a
name's failures out of memory. Past `name_limit` failures of a name within
`window` seconds (from any address), that name's logins are refused unchecked
until the oldest ages out; past `address_limit` failures from an address (under
any names), that address's logins are. A success forgets its name's failures.
Names that do not exist count alike: the answer never tells them apart. Refused
attempts are not stored, so an attacker at the limit adds no rows; rows older
than the window are deleted at each failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from micropatch.server import models as m

NAME_LENGTH = 64  # longer names and addresses are stored cut (the columns' size)


@dataclass(frozen=True)
class LoginThrottle:
    name_limit: int = 5
    address_limit: int = 20
    window: float = 900.0

    def wait(self, session: Session, name: str, address: str, now: float) -> float:
        """Seconds before `name` may try again from `address` (0: now)."""
        wait = 0.0
        for column, value, limit in (
            (m.LoginFailure.name, name, self.name_limit),
            (m.LoginFailure.address, address, self.address_limit),
        ):
            oldest = self._recent(session, column, value, now, limit)
            if len(oldest) >= limit:
                wait = max(wait, oldest[-1] + self.window - now)
        return wait

    def failed(self, session: Session, name: str, address: str, now: float) -> int:
        """Record a failure; how many `name` has in the window now, this one included."""
        session.execute(delete(m.LoginFailure).where(m.LoginFailure.time <= now - self.window))
        session.add(
            m.LoginFailure(time=now, name=name[:NAME_LENGTH], address=address[:NAME_LENGTH])
        )
        session.flush()
        return int(
            session.scalar(
                select(func.count()).where(
                    m.LoginFailure.name == name[:NAME_LENGTH],
                    m.LoginFailure.time > now - self.window,
                )
            )
            or 0
        )

    def succeeded(self, session: Session, name: str) -> None:
        session.execute(delete(m.LoginFailure).where(m.LoginFailure.name == name[:NAME_LENGTH]))

    def _recent(
        self,
        session: Session,
        column: InstrumentedAttribute[str],
        value: str,
        now: float,
        limit: int,
    ) -> list[float]:
        """The times of the newest `limit` failures for `column == value`, newest first."""
        query = (
            select(m.LoginFailure.time)
            .where(column == value[:NAME_LENGTH], m.LoginFailure.time > now - self.window)
            .order_by(m.LoginFailure.time.desc())
            .limit(limit)
        )
        return list(session.scalars(query))
