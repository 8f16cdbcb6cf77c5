"""Capacity of the default `pdserve up` beside `--mode colocated` and `--mode disaggregated`, interleaved.

    .venv/bin/python benchmarks/capacity_sweep.py [--rates 0.5 0.75 1.0] [--json benchmarks/results/capacity_sweep.json]

Capacity as DistServe defines goodput: the highest rate tried at which at least 90% of requests
meet both objectives (TTFT <= 3 s, TPOT <= 150 ms), on `pdserve bench load --workload mixed`.
The modes run in turn, A, B, C, A, B, C, because this shared machine's speed drifts within
minutes. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from plan_validation import PY, measured

from pdserve.planner.planner import Objectives

# --no-spare: a spare's imports would share the cores with the first seconds measured
COMMON = ["--http-port", "-1", "--metrics-port", "-1", "--kv-cache-gib", "0.5", "--no-spare"]
MODES = {"default (auto)": [], "colocated": ["--mode", "colocated"], "disaggregated": ["--mode", "disaggregated"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.75, 1.0])
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=50651)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    goal, work, runs = Objectives(), Path(tempfile.mkdtemp(prefix="capacity-")), []
    for round_ in range(args.rounds):
        for name, flags in MODES.items():
            argv = [
                PY,
                "-m",
                "pdserve",
                "up",
                *flags,
                "--port",
                str(args.port),
                "--base-port",
                str(args.port + 1),
                *COMMON,
            ]
            figures = measured(
                argv, f"{name.split()[0]}-{round_}", args.rates, args.num_requests, args.port, work, goal
            )
            met = [r for r in args.rates if figures[r]["attainment"] >= goal.attainment]
            runs.append({"round": round_, "mode": name, "capacity_rps": max(met, default=0.0), "rates": figures})
            chosen = [
                line
                for line in (work / f"up-{name.split()[0]}-{round_}.log").read_text().splitlines()
                if "--mode auto chose" in line
            ]
            print(
                f"round {round_} {name:<15} capacity {runs[-1]['capacity_rps']:.2f} req/s; attainment "
                + ", ".join(f"{r}: {figures[r]['attainment']:.0%}" for r in args.rates)
                + (f"\n    {chosen[0]}" if chosen else ""),
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"objectives": str(goal), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
