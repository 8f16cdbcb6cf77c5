"""A worker's admission check, run under the engine's lock atomically with the
queueing it guards (checked before an await, a burst would all pass)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdserve.common.engine.async_engine import AsyncEngine
from pdserve.common.engine.sequence import Sequence
from pdserve.common.errors import CapacityExhaustedError


@dataclass
class Admission:
    engine: AsyncEngine
    max_queue: int
    work: str  # "prefill" or "decode", as the refusal names it
    gate: Callable[[], None] = lambda: None  # raises while the worker takes no new work of this kind

    def check(self) -> None:
        self.gate()
        stats = self.engine.stats()
        if stats.waiting + stats.reserved >= self.max_queue:
            raise CapacityExhaustedError(f"{self.work} queue full ({self.max_queue} requests waiting)")

    def reserve(self, request_id: str, prompt: list[int]) -> Sequence:
        """Blocks for the prompt, if admitted."""
        self.check()
        return self.engine.reserve(request_id, prompt)
