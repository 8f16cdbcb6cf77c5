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
# How long cut requests get to send their last words (an error event, a status) to their clients.
_LAST_WORDS_S = 5.0


class ShuttingDownError(NotReadyError):
    """Refused or cut because the router is shutting down: UNAVAILABLE, HTTP 503."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class Shutdown:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s  # what running requests get to finish once draining begins
        self.draining = False
        self._scopes: set[asyncio.Timeout] = set()  # one per running request, cut by drain()
        self._idle = asyncio.Event()
        self._idle.set()

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
        requests, then cut those left and give them a moment to tell their clients.
        Calling it again is cheap."""
        self.draining = True
        if not self._scopes:
            return
        grace_s = self.grace_s if grace_s is None else grace_s
        log.info("draining %d running requests (grace %.1fs)", len(self._scopes), grace_s)
        if await self._wait_idle(grace_s):
            return
        log.warning("grace over: ending %d running requests with 'shutting down'", len(self._scopes))
        now = asyncio.get_running_loop().time()
        for cut in list(self._scopes):
            cut.reschedule(now)
        if not await self._wait_idle(_LAST_WORDS_S):
            log.warning("%d requests did not end within %.1fs of the cut", len(self._scopes), _LAST_WORDS_S)

    async def _wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
