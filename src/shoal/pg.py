"""One lazily opened asyncpg pool per Postgres DSN use (the lease and the job store).

Connecting on first use lets a node start (and serve, and run its other singletons)
while the database is down; callers retry on their own schedule. The schema each user
needs is created once, when the pool opens.

asyncpg was chosen over psycopg 3: it is asyncio-native, ships wheels that need no
libpq, and its pool reconnects after a broken connection by itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

QUERY_TIMEOUT = 2.0  # seconds, for every query shoal sends


class LazyPool:
    """A small pool (1-4 connections) to ``dsn``, opened by the first :meth:`get`."""

    def __init__(self, dsn: str, schema: str, purpose: str) -> None:
        self._dsn = dsn
        self._schema = schema
        self._purpose = purpose  # for the error when asyncpg is missing
        self._pool: Any = None
        self._opening = asyncio.Lock()  # two first callers must not open two pools

    async def get(self) -> Any:
        """The open pool (an ``asyncpg.Pool``), opening it and creating the schema first."""
        async with self._opening:
            if self._pool is None:
                self._pool = await self._open()
        return self._pool

    async def _open(self) -> Any:
        try:
            import asyncpg
        except ImportError:
            raise RuntimeError(
                f"{self._purpose} needs asyncpg: pip install 'shoal[lease]'"
            ) from None
        pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4, timeout=QUERY_TIMEOUT)
        try:
            await _create_schema(pool, self._schema)
        except BaseException:
            await pool.close()
            raise
        return pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


async def _create_schema(pool: Any, schema: str) -> None:
    import asyncpg

    for _ in range(3):  # concurrent CREATE IF NOT EXISTS can race on the catalog
        try:
            await pool.execute(schema, timeout=QUERY_TIMEOUT)
            return
        except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
            continue
