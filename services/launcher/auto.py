"""`pdserve up --mode auto`: the topology the planner ranks first for this machine, workload and objectives."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from pdserve.bench.workload import SYNTHETIC_OUTPUT, SYNTHETIC_PROMPT, Mixed, synthetic

WORKLOADS = ("mixed", "synthetic")


@dataclass(frozen=True)
class Choice:
    mode: str
    prefill: int
    decode: int
    threads: int
    chunk: int
    why: str


def resolve_mode(args: argparse.Namespace) -> str:
    """auto, unless the worker counts were given (or --elastic): then they name a disaggregated suite."""
    if args.mode == "auto" and (args.prefill is not None or args.decode is not None or args.elastic):
        return "disaggregated"
    return args.mode


def profile_file(args: argparse.Namespace, say=print) -> str:
    """The cached profile's path (measured now, once, if there is none), for the router's role balancer."""
    from pdserve.common import model_loader
    from pdserve.common.engine import precision
    from pdserve.planner import measure
    from pdserve.planner.profile import model_key

    device = (args.device or "cpu").split(",")[0]
    measure.load_or_measure(args.model, device=device, dtype=args.dtype or "auto", quick=True, say=say)
    ref = model_loader.resolve(args.model)
    return str(
        measure.cache_path(
            model_key(ref), precision.resolve(args.dtype or "auto", device).dtype, measure.hardware_key(device)
        )
    )


def choose(args: argparse.Namespace, say=print) -> Choice:
    """Plan from the cached profile (measured now, once, if there is none) and say what was chosen and why."""
    from pdserve.planner import measure  # torch: the launcher already runs with the workers' install
    from pdserve.planner.commands import objectives
    from pdserve.planner.planner import NoTopologyError, plan, reason, sim_requests

    devices = [d for d in (args.device or "").split(",") if d.startswith("cuda")]
    t0 = time.monotonic()
    profile = measure.load_or_measure(
        args.model, device=devices[0] if devices else "cpu", dtype=args.dtype or "auto", quick=True
    )
    took = time.monotonic() - t0
    if args.plan_workload == "mixed":

        def workload(rate):
            return Mixed().requests(sim_requests(rate), rate, seed=0)
    else:

        def workload(rate):
            return synthetic(sim_requests(rate), rate, SYNTHETIC_PROMPT, SYNTHETIC_OUTPUT, seed=0)

    goal = objectives(args)
    try:
        scores = plan(profile, workload, goal, cores=len(os.sched_getaffinity(0)), devices=len(devices))
        best, chose = scores[0].topology, f"chose {reason(scores)}"
    except NoTopologyError as e:  # a server still starts, and says it will miss them (pdserve plan refuses)
        best, chose = e.closest.topology, f"starts the closest, as {e}"
    why = (
        f"--mode auto {chose} (simulated on the {args.plan_workload} workload for {goal}; "
        f"profile {profile.hardware}, {took:.1f} s to load or measure)"
    )
    say(why)
    return Choice(best.mode, best.prefill, best.decode, best.threads, best.chunk, why)
