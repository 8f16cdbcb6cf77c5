"""`pdserve up --mode auto`: the topology the planner ranks first for this machine, workload and objectives."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from pdserve.bench.workload import Mixed, synthetic, SYNTHETIC_OUTPUT, SYNTHETIC_PROMPT

WORKLOADS = ("mixed", "synthetic")
PLAN_REQUESTS = 120


@dataclass(frozen=True)
class Choice:
    mode: str
    prefill: int
    decode: int
    threads: int
    chunk: int
    why: str


def resolve_mode(args: argparse.Namespace) -> str:
    """auto, unless the worker counts were given: then they name a disaggregated suite, as they always did."""
    if args.mode == "auto" and (args.prefill is not None or args.decode is not None):
        return "disaggregated"
    return args.mode


def choose(args: argparse.Namespace, say=print) -> Choice:
    """Plan from the cached profile (measured now, once, if there is none) and say what was chosen and why."""
    from pdserve.planner import measure  # torch: the launcher already runs with the workers' install
    from pdserve.planner.commands import objectives
    from pdserve.planner.planner import plan, reason

    devices = [d for d in (args.device or "").split(",") if d.startswith("cuda")]
    t0 = time.monotonic()
    profile = measure.load_or_measure(args.model, device=devices[0] if devices else "cpu",
                                      dtype=args.dtype or "auto", quick=True)
    took = time.monotonic() - t0
    if args.plan_workload == "mixed":
        def workload(rate):
            return Mixed().requests(PLAN_REQUESTS, rate, seed=0)
    else:
        def workload(rate):
            return synthetic(PLAN_REQUESTS, rate, SYNTHETIC_PROMPT, SYNTHETIC_OUTPUT, seed=0)
    goal = objectives(args)
    scores = plan(profile, workload, goal, cores=len(os.sched_getaffinity(0)), devices=len(devices))
    best = scores[0].topology
    why = (f"--mode auto chose {reason(scores)} (simulated on the {args.plan_workload} workload for {goal}; "
           f"profile {profile.hardware}, {took:.1f} s to load or measure)")
    say(why)
    return Choice(best.mode, best.prefill, best.decode, best.threads, best.chunk, why)
