"""The planner's predictions beside real runs: each topology at several rates, the same requests in both.

    .venv/bin/python benchmarks/plan_validation.py [--rates 0.25 0.5 1.0] \
        [--json benchmarks/results/plan_validation.json]

For every topology of this machine (2 cores: one colocated worker with 2 threads, two with
one, one prefill + one decode worker), starts `pdserve up` with it, runs `pdserve bench load`
at each rate, and simulates the very same requests from the cached profile (`pdserve
profile`). Topologies are visited in turn, twice (A, B, C, A, B, C) because this shared
machine's speed drifts within minutes; the table gives both runs. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdserve.bench import workload
from pdserve.bench.metrics import RequestRecord, Slo, summarize
from pdserve.planner import measure
from pdserve.planner.planner import Objectives, summary
from pdserve.planner.simulator import Topology, simulate

PY = sys.executable
LOAD = ["--workload", "mixed", "--no-progress"]
SEED = 11  # plus the rate's index: a rate's prompts are never in the suite's prefix cache from the one before
TOPOLOGIES = [Topology("colocated", 0, 1, 2), Topology("colocated", 0, 2, 1), Topology("disaggregated", 1, 1, 1)]


def up_argv(t: Topology, port: int) -> list[str]:
    shape = (
        ["--mode", "colocated", "--decode", str(t.decode)]
        if t.mode == "colocated"
        else ["--prefill", str(t.prefill), "--decode", str(t.decode)]
    )
    return [
        PY,
        "-m",
        "pdserve",
        "up",
        "--no-spare",  # its imports would share the cores with the first seconds measured
        *shape,
        "--threads",
        str(t.threads),
        "--port",
        str(port),
        "--base-port",
        str(port + 1),
        "--http-port",
        "-1",
        "--metrics-port",
        "-1",
        "--kv-cache-gib",
        "0.5",
    ]


def measured(
    argv: list[str], name: str, rates: list[float], n: int, port: int, work: Path, objectives: Objectives
) -> dict:
    """`pdserve up` with `argv`, then bench load at each rate (seed SEED + the rate's index): rate -> figures."""
    log = open(work / f"up-{name}.log", "w+")
    up = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    out = {}
    try:
        while "ready; clients connect" not in Path(log.name).read_text():
            if up.poll() is not None:
                raise SystemExit(Path(log.name).read_text()[-3000:])
            time.sleep(1)
        for i, rate in enumerate(rates):
            path = work / f"load-{port}-{rate}.json"
            subprocess.run(
                [
                    PY,
                    "-m",
                    "pdserve",
                    "bench",
                    "load",
                    "--target",
                    f"127.0.0.1:{port}",
                    "--rate",
                    str(rate),
                    "--num-requests",
                    str(n),
                    "--seed",
                    str(SEED + i),
                    "--json",
                    str(path),
                    *LOAD,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            records = [RequestRecord.from_dict(r) for r in json.loads(path.read_text())["requests"]]
            s = summarize(records, Slo(objectives.ttft_ms, objectives.tpot_ms, 0.0))
            out[rate] = {
                "goodput_rps": s["goodput_rps"],
                "attainment": s["slo_attainment"],
                "ttft_ms_p50": s["ttft_ms"]["p50"],
                "ttft_ms_p99": s["ttft_ms"]["p99"],
                "tpot_ms_p50": s["tpot_ms"]["p50"],
            }
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=50451)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    objectives = Objectives()
    profile = measure.load_or_measure(None, quick=False)
    wl_args = argparse.Namespace(**{**vars(workload_defaults()), "workload": "mixed"})
    work = Path(tempfile.mkdtemp(prefix="planval-"))
    rows = []
    for round_ in range(args.rounds):
        for t in TOPOLOGIES:
            real = measured(
                up_argv(t, args.port),
                f"{t.mode}-{t.decode}",
                args.rates,
                args.num_requests,
                args.port,
                work,
                objectives,
            )
            for i, rate in enumerate(args.rates):
                requests = workload.from_args(wl_args, rate=rate, n=args.num_requests, seed=SEED + i)
                predicted = summary(simulate(t, profile, requests), objectives)
                rows.append(
                    {"round": round_, "topology": str(t), "rate": rate, "measured": real[rate], "predicted": predicted}
                )
                print(row_text(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"profile": profile.hardware, "objectives": str(objectives), "rows": rows}, indent=1)
        )
    return 0


def workload_defaults() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    workload.add_args(p, default_workload="mixed")
    return p.parse_args([])


def row_text(r: dict) -> str:
    m, p = r["measured"], r["predicted"]
    cells = [f"{k} {m[k] or 0:.0f}/{p[k] or 0:.0f}" for k in ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50")]
    return (
        f"{r['topology']:<40} @{r['rate']:<5} goodput {m['goodput_rps']:.3f}/{p['goodput_rps']:.3f}  "
        + "  ".join(cells)
        + "  (measured/predicted)"
    )


if __name__ == "__main__":
    os.environ.setdefault("PDSERVE_LOG_FORMAT", "text")
    sys.exit(main())
