"""The planner: every topology the machine allows, simulated on a workload, ranked by capacity.

Capacity is DistServe's goodput: the highest Poisson rate at which at least
`Objectives.attainment` of requests meet both TTFT and TPOT objectives.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.bench.workload import Request
from pdserve.planner.profile import Profile
from pdserve.planner.simulator import Outcome, Topology, simulate

CHUNKS = (256, 512, 1024)
LEAST_REQUESTS = 150  # per simulated rate: a stable 90th percentile
STEADY_S = 90.0  # and at least this long of arrivals: queues and batches reach what the rate sustains
WARMUP_SHARE = 0.1  # the first arrivals, into an empty suite, are not scored


def sim_requests(rate: float) -> int:
    """How many requests to simulate at `rate`: enough to score, and to reach a steady state
    (too few at a high rate end before the queues grow, and overstate what it sustains)."""
    return max(LEAST_REQUESTS, math.ceil(rate * STEADY_S))


class NoTopologyError(ValueError):
    """No topology meets the objectives at any rate tried; `closest` has the lowest TTFT p99."""

    def __init__(self, message: str, closest: Score):
        super().__init__(message)
        self.closest = closest


@dataclass(frozen=True)
class Objectives:
    ttft_ms: float = 3000.0
    tpot_ms: float = 150.0
    attainment: float = 0.9  # share of requests within both

    def met(self, o: Outcome) -> bool:
        return o.ttft_ms <= self.ttft_ms and (o.tpot_ms is None or o.tpot_ms <= self.tpot_ms)

    def __str__(self) -> str:
        return f"TTFT <= {self.ttft_ms:g} ms and TPOT <= {self.tpot_ms:g} ms for {self.attainment:.0%} of requests"


@dataclass
class Score:
    topology: Topology
    capacity_rps: float
    at_capacity: dict = field(default_factory=dict)  # TTFT/TPOT percentiles and attainment there


def candidates(cores: int, devices: int = 0, chunks: tuple[int, ...] = CHUNKS) -> list[Topology]:
    """Colocated N workers and disaggregated P+D workers, each with an equal share of
    the cores (at least one) or one device each."""
    slots = devices or cores
    out = []
    for chunk in chunks:
        for n in range(1, slots + 1):
            out.append(Topology("colocated", 0, n, 1 if devices else cores // n, chunk))
        for p in range(1, slots):
            for d in range(1, slots - p + 1):
                out.append(Topology("disaggregated", p, d, 1 if devices else cores // (p + d), chunk))
    return out


def summary(outcomes: list[Outcome], objectives: Objectives, warmup_share: float = 0.0) -> dict:
    """Figures over the outcomes, less the first `warmup_share` of arrivals (into an empty suite)."""
    outcomes = sorted(outcomes, key=lambda o: o.arrival_s)[int(warmup_share * len(outcomes)) :]
    ttft = sorted(o.ttft_ms for o in outcomes)
    tpot = sorted(o.tpot_ms for o in outcomes if o.tpot_ms is not None)
    span = max(o.last_s for o in outcomes) - min(o.arrival_s for o in outcomes)
    met = sum(objectives.met(o) for o in outcomes)
    pick = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    return {
        "attainment": met / len(outcomes),
        "goodput_rps": met / span if span > 0 else 0.0,
        "ttft_ms_p50": statistics.median(ttft),
        "ttft_ms_p99": pick(ttft, 0.99),
        "tpot_ms_p50": statistics.median(tpot) if tpot else None,
        "tpot_ms_p99": pick(tpot, 0.99),
        "remote_share": sum(o.path == "remote" for o in outcomes) / len(outcomes),
    }


def capacity(
    topology: Topology,
    profile: Profile,
    workload: Callable[[float], list[Request]],
    objectives: Objectives,
    low: float = 0.02,
    high: float = 64.0,
) -> Score:
    """Bisect, on a log scale, for the highest rate whose attainment reaches the objective."""

    def run(rate: float) -> dict:
        return summary(simulate(topology, profile, workload(rate)), objectives, WARMUP_SHARE)

    if run(low)["attainment"] < objectives.attainment:
        return Score(topology, 0.0, run(low))
    good, bad = low, high
    for _ in range(12):
        mid = math.sqrt(good * bad)
        if run(mid)["attainment"] >= objectives.attainment:
            good = mid
        else:
            bad = mid
        if bad / good < 1.03:
            break
    return Score(topology, good, run(good))


def plan(
    profile: Profile,
    workload: Callable[[float], list[Request]],
    objectives: Objectives,
    *,
    cores: int,
    devices: int = 0,
    chunks: tuple[int, ...] = CHUNKS,
) -> list[Score]:
    """Every candidate's capacity, best first (ties: fewer workers, then the smaller chunk)."""
    scores = [capacity(t, profile, workload, objectives) for t in candidates(cores, devices, chunks)]
    scores.sort(key=lambda s: (-round(s.capacity_rps, 3), s.topology.prefill + s.topology.decode, s.topology.chunk))
    if scores[0].capacity_rps == 0.0:
        closest = min(scores, key=lambda s: s.at_capacity["ttft_ms_p99"])
        raise NoTopologyError(
            f"no topology meets {objectives}, even at 0.02 req/s; the closest: {closest.topology} "
            f"(TTFT p99 {closest.at_capacity['ttft_ms_p99']:.0f} ms, TPOT p50 "
            f"{closest.at_capacity['tpot_ms_p50'] or 0:.0f} ms)",
            closest,
        )
    return scores


def reason(scores: list[Score]) -> str:
    """Why the first is recommended, against the best of the other mode."""
    best = scores[0]
    other = next((s for s in scores if s.topology.mode != best.topology.mode), None)
    text = f"{best.topology}: capacity {best.capacity_rps:.2f} req/s"
    if other is None:
        return text
    if other.capacity_rps == 0:
        versus = f"while no {other.topology.mode} topology meets the objectives at any rate tried"
    else:
        versus = (
            f"{best.capacity_rps / other.capacity_rps:.2f}x the best {other.topology.mode} "
            f"({other.topology}: {other.capacity_rps:.2f})"
        )
    why = (
        "splitting the cores between the phases slows each more than the interference it removes costs"
        if best.topology.mode == "colocated"
        else "long prefills stall colocated decoding more than a separate prefill worker costs"
    )
    return f"{text}, {versus}: {why}"
