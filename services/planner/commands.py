"""`pdserve profile` (measure this machine) and `pdserve plan` (rank the topologies it allows)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from pdserve.bench import workload
from pdserve.bench.mooncake import TraceError
from pdserve.planner.planner import CHUNKS, NoTopologyError, Objectives, Score, plan, reason, sim_requests
from pdserve.planner.profile import Profile, ProfileMismatchError, model_key


def add_objective_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slo-ttft-ms", type=float, default=Objectives.ttft_ms, help="time-to-first-token objective")
    p.add_argument("--slo-tpot-ms", type=float, default=Objectives.tpot_ms, help="time-per-output-token objective")
    p.add_argument(
        "--attainment",
        type=float,
        default=Objectives.attainment,
        help="share of requests that must meet both objectives",
    )


def objectives(args: argparse.Namespace) -> Objectives:
    if args.slo_ttft_ms <= 0 or args.slo_tpot_ms <= 0 or not 0 < args.attainment <= 1:
        raise ValueError("--slo-ttft-ms and --slo-tpot-ms must be > 0, --attainment in (0, 1]")
    return Objectives(args.slo_ttft_ms, args.slo_tpot_ms, args.attainment)


def add_commands(sub) -> None:
    add_profile_command(sub)
    add_plan_command(sub)


def add_profile_command(sub) -> None:
    p = sub.add_parser("profile", help="measure engine steps on this machine for the planner; cache the profile")
    p.add_argument("--model", default=None, help="HF directory, .gguf file or hub id (default: bundled SmolLM2)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts to measure (default: 1, 2, 4, ... up to the usable cores)",
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (seconds)")
    p.add_argument("--out", default=None, help="write the profile here (default: the cache `pdserve plan` reads)")
    p.set_defaults(func=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    from pdserve.planner import measure

    profile, samples = measure.measure(args.model, args.device, args.dtype, tuple(args.threads or ()), args.quick)
    path = args.out or measure.cache_path(profile.model, profile.dtype, profile.hardware)
    profile.save(Path(path))
    print(f"{profile.model}, {profile.dtype}, {profile.hardware}: saved to {path}")
    print("threads  base ms  per decode seq  per context tok  per prompt tok  per attn pair  fit error (mean, max)")
    errors = measure.fit_error(profile, samples)
    for t, m in sorted(profile.steps.items()):
        print(
            f"{t:>7}  {m.base_ms:7.2f}  {m.per_seq_ms:14.4f}  {m.per_context_ms:15.5f}  {m.per_prompt_token_ms:14.4f}"
            f"  {m.per_pair_ms:13.6f}  {errors[t][0]:.1%}, {errors[t][1]:.1%}"
        )
    print(
        f"KV transfer {profile.transfer_base_ms:g} ms + {profile.transfer_ms_per_block:.4f} ms/block; "
        f"router hop {profile.router_hop_ms:g} ms ({'; '.join(f'{k}: {v}' for k, v in profile.notes.items())})"
    )
    return 0


def add_plan_command(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="simulate every topology this machine allows; rank them by capacity",
        description="Capacity: the highest Poisson rate at which --attainment of the requests meet "
        "both objectives, simulated from a measured profile (`pdserve profile`).",
    )
    p.add_argument("--profile", default=None, help="a profile JSON (default: the cached one for --model)")
    p.add_argument(
        "--model",
        default=None,
        help="whose cached profile (default: bundled SmolLM2); with --profile, "
        "the model it must have been measured for",
    )
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="cores to share among workers")
    p.add_argument("--devices", type=int, default=0, help="accelerators, one per worker (0: CPU workers)")
    p.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS), help="prefill chunk sizes to try")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    p.add_argument("--json", default=None, help="write every score here")
    p.add_argument("--plot", default=None, help="draw capacity by topology to this PNG (needs matplotlib)")
    add_objective_args(p)
    workload.add_args(p, default_workload="mixed")
    p.set_defaults(func=run_plan)


def load_profile(args: argparse.Namespace) -> Profile:
    """--profile (of --model, when given: it may be another machine's, to plan for it), else the cached one."""
    if args.profile:
        profile = Profile.load(args.profile)
        if args.model:
            from pdserve.common import model_loader

            theirs = model_key(model_loader.resolve(args.model))
            if profile.model != theirs:
                raise ProfileMismatchError(
                    f"{args.profile} was measured for model {profile.model!r}, "
                    f"not {theirs!r}; measure one with `pdserve profile`"
                )
        return profile
    from pdserve.planner import measure  # torch: only when a profile has to be found or measured

    return measure.load_or_measure(args.model, quick=True)


def table(scores: list[Score], top: int) -> str:
    rows = [("topology", "capacity req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "remote prefill")]
    for s in scores[:top]:
        a = s.at_capacity
        rows.append(
            (
                str(s.topology),
                f"{s.capacity_rps:.2f}",
                f"{a['ttft_ms_p50']:.0f}",
                f"{a['ttft_ms_p99']:.0f}",
                f"{a['tpot_ms_p50'] or 0:.0f}",
                f"{a['remote_share']:.0%}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run_plan(args: argparse.Namespace) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # said before planning, not after
        print("pdserve plan: --plot needs matplotlib: pip install 'pdserve[bench]'", file=sys.stderr)
        return 2
    try:
        goal = objectives(args)
        profile = load_profile(args)
        workload.from_args(args, n=1)  # a bad trace fails here, naming its line
        scores = plan(
            profile,
            lambda rate: workload.from_args(args, rate=rate, n=sim_requests(rate)),
            goal,
            cores=args.cores,
            devices=args.devices,
            chunks=tuple(args.chunks),
        )
    except (ValueError, TraceError, ProfileMismatchError, NoTopologyError, OSError) as e:
        print(f"pdserve plan: {e}", file=sys.stderr)
        return 2
    print(f"objectives: {goal}; profile: {profile.hardware}, {profile.dtype}, measured {profile.measured_at}")
    print(table(scores, args.top))
    print(f"recommended: {reason(scores)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [{"topology": str(s.topology), "capacity_rps": s.capacity_rps, **s.at_capacity} for s in scores],
                f,
                indent=1,
            )
    if args.plot:
        draw(scores, args.plot)
    return 0


def draw(scores: list[Score], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(scores) + 1))
    names = [str(s.topology) for s in scores][::-1]
    colors = ["tab:blue" if s.topology.mode == "colocated" else "tab:orange" for s in scores][::-1]
    ax.barh(names, [s.capacity_rps for s in scores][::-1], color=colors)
    ax.set_xlabel("simulated capacity (req/s within the objectives)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
