"""When a crashed service is started again, and when it is given up (a crash loop)."""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff between restarts; `limit` exits within `window_s` is a crash loop."""

    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    limit: int = 5
    window_s: float = 60.0
    spare: bool = True  # keep a worker process imported for a crashed worker to restart in (spare.py)

    def __post_init__(self) -> None:
        if self.limit < 1 or self.backoff_s < 0 or self.window_s <= 0:
            raise ValueError(f"restart policy: limit >= 1, backoff >= 0 and window > 0, not {self}")


class Phase(enum.Enum):
    STARTING = "starting"  # spawned, not yet SERVING
    SERVING = "serving"
    DRAINING = "draining"  # told to stop by a rolling restart; its exit is expected
    BACKOFF = "backoff"  # exited; starts again at `restart_at`
    GIVEN_UP = "given up"  # a crash loop: not started again
    STOPPED = "stopped"


@dataclass
class ServiceState:
    """What the launcher knows of one service, as `pdserve status` shows it."""

    phase: Phase = Phase.STARTING
    restarts: int = 0
    started_at: float = field(default_factory=time.time)  # wall clock, for uptime
    last_exit: int | None = None
    restart_at: float = 0.0  # monotonic
    exits: deque[float] = field(default_factory=deque)  # monotonic times within the window

    def exited(self, code: int, policy: RestartPolicy, now: float) -> float | None:
        """Record an unexpected exit: the delay before the next start, or None to give up."""
        self.last_exit = code
        self.exits.append(now)
        while self.exits and now - self.exits[0] > policy.window_s:
            self.exits.popleft()
        if len(self.exits) >= policy.limit:
            self.phase = Phase.GIVEN_UP
            return None
        delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** (len(self.exits) - 1))
        self.phase = Phase.BACKOFF
        self.restart_at = now + delay
        return delay

    def spawned(self, restart: bool) -> None:
        self.phase = Phase.STARTING
        self.started_at = time.time()
        self.restarts += restart


def usable(roles: dict[str, str], given_up: set[str]) -> str | None:
    """Why the suite cannot serve without the services in `given_up` (None: it can).
    `roles` maps each service to its role. The router is needed, and one decode
    worker of any number; prefill workers and the KV store are not (decode workers
    prefill locally, and a request with no store recomputes). A service with no
    known role counts as needed."""
    for name, role in roles.items():
        if name in given_up and role not in ("decode", "prefill", "kvstore"):
            return f"{name} was given up"
    decode = [n for n, r in roles.items() if r == "decode"]
    if decode and all(n in given_up for n in decode):
        return "every decode worker was given up"
    return None
