"""Leases in Postgres for `lease`-mode singletons, with fencing tokens.

The database's clock alone decides expiry, so node clocks need not agree.
Every takeover increments the token; a holder renews only its own token, so a
paused holder that wakes up after a takeover can no longer renew, and
`claim_tick` refuses work stamped with a stale token.

asyncpg was chosen over psycopg 3: it is asyncio-native (see shoal.pg).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from shoal.pg import QUERY_TIMEOUT, LazyPool

log = logging.getLogger("shoal.lease")

SCHEMA = """
CREATE TABLE IF NOT EXISTS shoal_leases (
    name text PRIMARY KEY,
    owner text NOT NULL,
    token bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS shoal_job_ticks (
    job text NOT NULL,
    tick timestamptz NOT NULL,
    token bigint NOT NULL,
    PRIMARY KEY (job, tick)
);
"""

ACQUIRE = """
INSERT INTO shoal_leases AS l (name, owner, token, expires_at)
VALUES ($1, $2, 1, now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE
    SET owner = EXCLUDED.owner, token = l.token + 1, expires_at = EXCLUDED.expires_at
    WHERE l.expires_at < now()
RETURNING token
"""

RENEW = """
UPDATE shoal_leases SET expires_at = now() + make_interval(secs => $4)
WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > now()
RETURNING token
"""

RELEASE = """
UPDATE shoal_leases SET expires_at = now() - interval '1 millisecond'
WHERE name = $1 AND owner = $2 AND token = $3
"""

CLAIM_TICK = """
INSERT INTO shoal_job_ticks (job, tick, token)
SELECT $1, $2, $3
WHERE EXISTS (
    SELECT 1 FROM shoal_leases WHERE name = $4 AND token = $3 AND expires_at > now()
)
ON CONFLICT DO NOTHING
RETURNING token
"""

PRUNE_TICKS = "DELETE FROM shoal_job_ticks WHERE tick < now() - interval '1 day'"


class LeaseBackend:
    """The lease table in Postgres, through a pool opened on first use (see shoal.pg).

    Connecting lazily lets a node start (and serve, and run its other
    singletons) while the database is down; the lease loop keeps retrying.
    """

    def __init__(self, dsn: str) -> None:
        self._pool = LazyPool(dsn, SCHEMA, "lease mode")

    async def _connected(self) -> Any:
        return await self._pool.get()

    async def acquire(self, name: str, owner: str, ttl: float) -> int | None:
        """The new fencing token if the lease was free (or expired), else None."""
        token = await (await self._connected()).fetchval(
            ACQUIRE, name, owner, ttl, timeout=QUERY_TIMEOUT
        )
        if token is not None:
            await (await self._connected()).execute(PRUNE_TICKS, timeout=QUERY_TIMEOUT)
        return None if token is None else int(token)

    async def renew(self, name: str, owner: str, token: int, ttl: float) -> bool:
        result = await (await self._connected()).fetchval(
            RENEW, name, owner, token, ttl, timeout=QUERY_TIMEOUT
        )
        return result is not None

    async def release(self, name: str, owner: str, token: int) -> None:
        """Expire our lease now, so the next node need not wait for the TTL."""
        await (await self._connected()).execute(RELEASE, name, owner, token, timeout=QUERY_TIMEOUT)

    async def claim_tick(self, lease: str, token: int, job: str, tick: datetime) -> bool:
        """Record that `job`'s `tick` runs under `token`; False if already run or fenced off."""
        result = await (await self._connected()).fetchval(
            CLAIM_TICK, job, tick, token, lease, timeout=QUERY_TIMEOUT
        )
        return result is not None

    async def close(self) -> None:
        await self._pool.close()
