"""The router's shutdown as both front ends (gRPC Generate, OpenAI HTTP) live it: admit, drain, cut.

Every generation runs inside `Shutdown.scope()`. `drain()` refuses new ones, gives the running
ones the grace period, then cuts the rest: each scope cancels its body (which cancels the
downstream calls) and raises ShuttingDownError in its place, so the front end still says why
(an error event on SSE, UNAVAILABLE on gRPC) instead of ending the stream without a word.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from pdserve.common.errors import NotReadyError

log = logging.getLogger(__name__)
# How long cut requests get to leave their scopes; the front ends then write their last words
# (an error event within aiohttp's shutdown_timeout, a status within the gRPC stop's grace).
LAST_WORDS_S = 5.0


class ShuttingDownError(NotReadyError):
    """Refused or cut because the router is shutting down: UNAVAILABLE, HTTP 503."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class Shutdown:
    """Admission and the drain, shared by both front ends of one router."""

    def __init__(self, grace_s: float = 10.0):  # as RouterConfig.grace_s
        self.grace_s = grace_s  # what running requests get to finish once draining begins
        self.draining = False
        self._scopes: set[asyncio.Timeout] = set()  # one per running request, cut by drain()
        self._idle = asyncio.Event()
        self._idle.set()
        self._grace_over = asyncio.Event()  # end_grace(): cut now
        self._drained: asyncio.Future | None = None  # the one drain; later calls wait for it

    def admit(self) -> None:
        """Raise ShuttingDownError once draining has begun."""
        if self.draining:
            raise ShuttingDownError()

    @property
    def running(self) -> int:
        return len(self._scopes)

    @contextlib.asynccontextmanager
    async def scope(self) -> AsyncIterator[None]:
        """Run the body until drain() cuts it; the cut raises ShuttingDownError here.
        A cut is a timeout that expires now: asyncio tells it apart from any other cancel."""
        try:
            async with asyncio.timeout(None) as cut:
                self._scopes.add(cut)
                self._idle.clear()
                try:
                    yield
                finally:
                    self._scopes.discard(cut)  # before the timeout exits: drain() only reschedules live ones
                    if not self._scopes:
                        self._idle.set()
        except TimeoutError:
            if not cut.expired():
                raise
            raise ShuttingDownError() from None

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop admitting, wait up to the grace period (default: the router's) for running
        requests, then cut those left. Every later call waits for that first drain."""
        self.draining = True
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain(self.grace_s if grace_s is None else grace_s))
        await asyncio.shield(self._drained)

    def end_grace(self) -> None:
        """Cut the running requests now, not at the grace's end."""
        self._grace_over.set()

    async def _drain(self, grace_s: float) -> None:
        if not self._scopes:
            return
        log.info("draining %d running requests (grace %.1fs)", len(self._scopes), grace_s)
        if await self._wait_idle(grace_s, self._grace_over):
            return
        log.warning("grace over: ending %d running requests with 'shutting down'", len(self._scopes))
        now = asyncio.get_running_loop().time()
        for cut in list(self._scopes):
            cut.reschedule(now)
        if not await self._wait_idle(LAST_WORDS_S):
            log.warning("%d requests did not end within %.1fs of the cut", len(self._scopes), LAST_WORDS_S)

    async def _wait_idle(self, timeout_s: float, give_up: asyncio.Event | None = None) -> bool:
        """Whether every scope ended within `timeout_s` (False early once `give_up` is set)."""
        waits = [asyncio.ensure_future(self._idle.wait())]
        if give_up is not None:
            waits.append(asyncio.ensure_future(give_up.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self._idle.is_set()
