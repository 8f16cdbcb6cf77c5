"""Background loops that outlive a failed round: a long-running service's sweepers and polls.

Their tasks are only ever cancelled, never awaited, so an exception would end one silently and
for good (a lease sweeper that stops leaves reservations that never expire).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(interval_s: float, round_: Callable[[], Awaitable[object]], name: str) -> None:
    """Await round_() every interval_s, for ever; a round that raises is logged, and the next one runs."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await round_()
        except Exception:
            log.exception("%s: a round failed; the next one runs in %.1f s", name, interval_s)
