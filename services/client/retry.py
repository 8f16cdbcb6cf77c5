"""When the SDK calls again: UNAVAILABLE before the first token, with backoff, within a bound.

Never after a token arrived: the router already carries a started stream over
a worker's failure, and a second call would send the client those tokens again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` calls at most, the first included (1: no retry), `initial_backoff_s`
    doubling up to `max_backoff_s` between them, each drawn with +-`jitter` so that
    clients cut off together do not all come back at once."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or not 0 <= self.jitter < 1:
            raise ValueError(f"retry policy: max_attempts >= 1, backoff >= 0, jitter in [0, 1), not {self}")

    def backoff_s(self, failed_attempts: int) -> float:
        """The wait after the `failed_attempts`-th failure (1, 2, ...)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (failed_attempts - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def allows(self, code: grpc.StatusCode, failed_attempts: int, streamed: bool) -> bool:
        return code == grpc.StatusCode.UNAVAILABLE and not streamed and failed_attempts < self.max_attempts


NO_RETRY = RetryPolicy(max_attempts=1)
