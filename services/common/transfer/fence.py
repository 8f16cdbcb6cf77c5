"""Blocks quarantined behind a cancel that could not be fenced, given back once it is.

A receive that a stalled sender left mid-message may still complete (the rest of the message
arrives): then nothing can land any more (KVReceiver.when_fenced), and the blocks held out of
use for it can be used again. Why: docs/transfer.md ("Cancellation").
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Reclaims:
    """Waits for fences in the background; after each, its `reclaim` gives the blocks back."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def after(self, fenced: Awaitable[None], reclaim: Callable[[], int | Awaitable[int]], what: str) -> None:
        task = asyncio.ensure_future(self._reclaim(fenced, reclaim, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _reclaim(fenced: Awaitable[None], reclaim: Callable[[], int | Awaitable[int]], what: str) -> None:
        await asyncio.shield(fenced)  # cancelling this wait must not cancel the receiver's fence
        n = reclaim()
        if inspect.isawaitable(n):
            n = await n
        log.warning("%s: its transfer is fenced after all; %d quarantined blocks back in use", what, n)

    def cancel(self) -> None:
        """At shutdown: the blocks go with the process."""
        for task in self._tasks:
            task.cancel()
