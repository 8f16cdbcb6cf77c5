"""Leases: reservations that free themselves unless claimed in time.

A lease is an owner key, what it holds and an expiry; a sweeper hands expired ones to the owner's release
callback, and claiming one stops its clock. Why: docs/reliability.md ("Leases").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar

from pdserve.common import periodic

log = logging.getLogger(__name__)
T = TypeVar("T")


class Leases(Generic[T]):
    def __init__(self, release: Callable[[str], Awaitable[object]], name: str, interval_s: float = 0.5):
        self._release = release
        self.name = name
        self.interval_s = interval_s
        self._items: dict[str, tuple[T, float]] = {}  # key -> (held, expiry, unix time)
        self._task: asyncio.Task | None = None
        self.expired = 0

    def start(self) -> None:
        sweeper = f"{self.name}-lease-sweeper"
        self._task = asyncio.create_task(periodic.every(self.interval_s, self._sweep, sweeper), name=sweeper)

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def add(self, key: str, held: T, ttl_s: float) -> float:
        """Returns the expiry (unix time)."""
        expires_at = time.time() + ttl_s
        self._items[key] = (held, expires_at)
        return expires_at

    def expiry(self, key: str) -> float | None:
        """When `key`'s lease ends (unix time), if it is held."""
        item = self._items.get(key)
        return item[1] if item else None

    def get(self, key: str) -> T | None:
        item = self._items.get(key)
        return item[0] if item else None

    def claim(self, key: str) -> T | None:
        """Stop the clock: the lease is now in use."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items[key] = (item[0], float("inf"))
        return item[0]

    def pop(self, key: str) -> T | None:
        item = self._items.pop(key, None)
        return item[0] if item else None

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    async def _sweep(self) -> None:
        now = time.time()
        for key in list(self._items):
            # Looked up again: a release awaited before this one may have let it be claimed (or freed).
            current = self._items.get(key)
            if current is not None and current[1] < now:
                log.warning("%s lease %s expired unused; freeing it", self.name, key)
                try:
                    await self._release(key)
                    self.expired += 1
                except Exception:  # the others are still freed; this one is tried again next round
                    log.exception("%s lease %s: its release failed", self.name, key)
