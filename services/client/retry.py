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

    # 0.25 + 0.5 + 1 + 2 + 2 + 2 s of waits: longer than `pdserve up` takes to restart a router (served
    # again 2.1-4.2 s after a SIGKILL, measured), which 4 attempts' 1.75 s did not cover.
    max_attempts: int = 7
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

# gRPC waits 1 s, then longer, before it dials a lost router again, and calls fail at once meanwhile:
# retries that came back in time would still find the channel waiting. Dialled again within 0.1-1 s.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
