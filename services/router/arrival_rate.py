"""Requests per second arriving at one worker, as an exponentially decaying count.

The routing policy prices a local prefill by the streams it would stall; streams
that arrive while it runs stall too, so it needs the rate at which they come.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass
class ArrivalRate:
    window_s: float = 30.0  # how far back arrivals still count, decaying
    _rate: float = 0.0
    _at: float = 0.0

    def add(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._rate = self.per_s(now) + 1.0 / self.window_s
        self._at = now

    def per_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return self._rate * math.exp(-(now - self._at) / self.window_s)
