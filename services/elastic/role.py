"""An elastic worker's role: the work it takes, and the switch to another role.

The switch is immediate for new work and waits for the work in flight of the
role it leaves; nothing is cancelled, so no request fails across it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.common.errors import InvalidRequestError, NotReadyError
from pdserve.common.roles import ELASTIC_ROLES, TAKES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Switched:
    previous: str
    role: str
    drained: bool  # False: the timeout passed with work of the left role still running (it runs on)
    drain_ms: float
    epoch: int  # switches so far, this one included


class ElasticRole:
    def __init__(
        self,
        role: str,
        idle: dict[str, Callable[[], bool]],
        on_switch: Callable[[str, int], None] = lambda role, epoch: None,
        poll_s: float = 0.05,
    ):
        if role not in ELASTIC_ROLES:
            raise InvalidRequestError("role", f"an elastic worker is prefill, decode or both, got {role!r}")
        self.role = role
        self.idle = idle  # "prefill"/"decode" -> whether that work in flight has all finished
        self.on_switch = on_switch
        self.poll_s = poll_s
        self.epoch = 0  # switches so far: reports carry it, so a router can tell a stale one
        self._lock = asyncio.Lock()  # one switch at a time: each drains what the one before left

    def gate(self, work: str) -> Callable[[], None]:
        """The admission check of `work` ("prefill" or "decode"): raises while the role excludes it."""

        def check() -> None:
            if work not in TAKES[self.role]:
                raise NotReadyError(f"this worker's role is {self.role} now: it takes no new {work} work")

        return check

    async def switch(self, role: str, drain_timeout_s: float = 120.0) -> Switched:
        if role not in ELASTIC_ROLES:
            raise InvalidRequestError("role", f"an elastic worker is prefill, decode or both, got {role!r}")
        async with self._lock:
            previous, self.role = self.role, role
            self.epoch += 1
            self.on_switch(role, self.epoch)
            left = TAKES[previous] - TAKES[role]
            t0 = time.monotonic()
            while not all(self.idle[w]() for w in left) and time.monotonic() - t0 < drain_timeout_s:
                await asyncio.sleep(self.poll_s)
            drained = all(self.idle[w]() for w in left)
            ms = (time.monotonic() - t0) * 1e3
            log.info("role %s -> %s (%s in %.0f ms)", previous, role, "drained" if drained else "NOT drained", ms)
            return Switched(previous, role, drained, ms, self.epoch)
