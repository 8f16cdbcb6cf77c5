"""Elastic workers' roles fitted to the live arrival mix: the recent arrivals replayed
through the planner's simulator for every prefill/decode split, with hysteresis so
roles do not flap. Why and how: docs/planning.md ("Elastic roles").
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from pdserve.bench.workload import Request
from pdserve.common import periodic
from pdserve.planner.planner import Objectives
from pdserve.planner.profile import Profile
from pdserve.planner.simulator import Topology, simulate
from pdserve.router.roles import switch_role
from pdserve.router.worker_pool import WorkerPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    at: float  # time.monotonic() when the router admitted it
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class BalancerConfig:
    interval_s: float = 15.0
    window_s: float = 120.0  # the arrivals replayed
    margin: float = 0.1  # share of requests within the objectives a better split must add
    confirm: int = 3  # evaluations in a row it must win
    dwell_s: float = 60.0  # after a switch, none sooner
    min_requests: int = 12  # fewer arrivals in the window say too little to act on


class Hysteresis:
    """Which split to move to, given every split's score at one evaluation (or None: stay)."""

    def __init__(self, margin: float, confirm: int, dwell_s: float):
        self.margin = margin
        self.confirm = confirm
        self.dwell_s = dwell_s
        self.candidate: int | None = None
        self.streak = 0
        self.last_switch = float("-inf")

    def step(self, now: float, current: int, scores: dict[int, float]) -> int | None:
        best = max(scores, key=lambda p: (scores[p], -abs(p - current)))  # a tie: the split nearest the current
        if best == current or scores[best] < scores.get(current, 0.0) + self.margin:
            self.candidate = None
            self.streak = 0
            return None
        if best != self.candidate:
            self.candidate = best
            self.streak = 0
        self.streak += 1
        if self.streak < self.confirm or now - self.last_switch < self.dwell_s:
            return None
        self.candidate = None
        self.streak = 0
        self.last_switch = now
        return best


class RoleBalancer:
    def __init__(
        self,
        pool: WorkerPool,
        profile: Profile,
        objectives: Objectives,
        config: BalancerConfig,
        threads: int = 0,
        chunk: int = 512,
        max_seqs: int = 64,
    ):
        self.pool = pool
        self.profile = profile
        self.objectives = objectives
        self.config = config
        self.threads = threads or min(profile.steps)
        self.chunk = chunk
        self.max_seqs = max_seqs
        self.hysteresis = Hysteresis(config.margin, config.confirm, config.dwell_s)
        self.arrivals: collections.deque[Arrival] = collections.deque()
        self.last_scores: dict[int, float] = {}
        self.refused = ""  # why the profile was refused for these workers, if it was
        self._task: asyncio.Task | None = None

    def observe(self, prompt_tokens: int, max_tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.arrivals.append(Arrival(now, prompt_tokens, max_tokens))
        while self.arrivals and self.arrivals[0].at < now - self.config.window_s:
            self.arrivals.popleft()

    def _fleet(self) -> tuple[int, int, list]:
        """Fixed prefill and decode workers (an elastic one in role both decodes), and the movable ones."""
        routable = [w for w in self.pool.all if w.routable]
        movable = [w for w in routable if w.elastic and w.role in ("prefill", "decode") and not w.switching_to]
        fixed_p = sum(1 for w in routable if w not in movable and w.role == "prefill")
        return fixed_p, len(routable) - len(movable) - fixed_p, movable

    def scores(self, now: float) -> dict[int, float]:
        """Attainment by the number of movable workers in role prefill, for the recent arrivals."""
        fixed_p, fixed_d, movable = self._fleet()
        window = [a for a in self.arrivals if a.at >= now - self.config.window_s]
        if not movable or len(window) < self.config.min_requests:
            return {}
        t0 = window[0].at
        # Only its length is simulated: a range is a prompt of that many tokens in constant memory.
        requests = [Request(i, a.at - t0, range(a.prompt_tokens), max(1, a.max_tokens)) for i, a in enumerate(window)]
        out = {}
        for p in range(len(movable) + 1):
            prefill, decode = fixed_p + p, fixed_d + len(movable) - p
            if decode == 0:
                continue
            topology = Topology(
                "disaggregated" if prefill else "colocated", prefill, decode, self.threads, self.chunk, self.max_seqs
            )
            outcomes = simulate(topology, self.profile, requests)
            out[p] = sum(self.objectives.met(o) for o in outcomes) / len(outcomes)
        return out

    def mismatch(self) -> str:
        """Why the profile does not describe the elastic workers ("" when it does)."""
        for w in self.pool.all:
            k = w.info.kv_spec if w.elastic else None
            if k and k.model_name:
                theirs = f"{k.model_name}@{k.weights_digest[:16] or 'undigested'}"
                if (theirs, k.dtype) != (self.profile.model, self.profile.dtype):
                    return (
                        f"the profile was measured for {self.profile.model} ({self.profile.dtype}); "
                        f"{w.worker_id} serves {theirs} ({k.dtype})"
                    )
        return ""

    async def evaluate(self, now: float | None = None) -> str | None:
        """One evaluation; the worker it moved, if any."""
        now = time.monotonic() if now is None else now
        if why := self.mismatch():  # its predictions would be of another model: no switch on them
            if why != self.refused:
                log.error("balancer: not balancing: %s", why)
            self.refused = why
            return None
        self.last_scores = await asyncio.to_thread(self.scores, now)  # a simulation takes ~0.1 s: off the loop
        if not self.last_scores:
            return None
        _, _, movable = self._fleet()
        current = sum(w.role == "prefill" for w in movable)
        target = self.hysteresis.step(now, current, self.last_scores)
        if target is None:
            return None
        leaving = "decode" if target > current else "prefill"
        w = min((w for w in movable if w.role == leaving), key=lambda w: w.inflight)
        role = "prefill" if leaving == "decode" else "decode"
        log.info(
            "balancer: %s -> %s (attainment by prefill workers: %s)",
            w.worker_id,
            role,
            {p: round(s, 2) for p, s in self.last_scores.items()},
        )
        await switch_role(self.pool, w.worker_id, role, reason="balancer")
        return w.worker_id

    def start(self) -> None:
        # A failed round (a switch refused) leaves the roles as they were; the next one tries again.
        loop = periodic.every(self.config.interval_s, self.evaluate, "role-balancer")
        self._task = asyncio.create_task(loop, name="role-balancer")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
