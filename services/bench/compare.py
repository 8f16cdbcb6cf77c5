"""`pdserve bench compare`: the same workload on three suites, one after another.

`colocated`, `colocated-chunked` and `disaggregated`, each idle then at each of --rates, against objectives
from --slo-from's idle run; writes compare.json, compare.md and plots into --out (--from-json: redo them).
Modes, objectives and results: docs/benchmarks.md ("Colocated vs disaggregated").
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import math
import time
from pathlib import Path

from pdserve.bench import cores, plots, report, senders, workload
from pdserve.bench.loadgen import ProgressLine, command_line, run_open, send_one, warm_up
from pdserve.bench.metrics import RequestRecord
from pdserve.common import affinity
from pdserve.launcher import Suite, plan

MODES = ("colocated", "colocated-chunked", "disaggregated")


def services(name: str, args: argparse.Namespace) -> tuple[list, dict]:
    """The suite of one mode (launcher.plan with per-mode worker flags), and its pinning."""
    mode = "disaggregated" if name == "disaggregated" else "colocated"
    budget = args.unchunked_tokens if name == "colocated" else args.chunk_tokens
    pins: dict[str, list[int] | None] = {"decode": None}  # colocated: every core
    if mode == "disaggregated":
        halves = cores.halves(affinity.available())
        pins = {
            "prefill": affinity.parse(args.prefill_cores) if args.prefill_cores else halves[0],
            "decode": affinity.parse(args.decode_cores) if args.decode_cores else halves[1],
        }
    out = []
    for s in plan(
        mode,
        1,
        1,
        model=args.model,
        port=args.port,
        base_port=args.port + 10,
        kv_cache_gib=args.kv_cache_gib,
        http_port=-1,
    ):
        role = s.name.split("-")[0]
        if role in pins:  # a model worker
            s = dataclasses.replace(
                s, argv=cores.pinned((*s.argv, "--max-num-batched-tokens", str(budget)), pins[role])
            )
        out.append(s)
    return out, {
        "max_num_batched_tokens": budget,
        "cores": {k: v or affinity.available() for k, v in pins.items()},
        "router_cores": affinity.available(),
    }


def idle_sample(args: argparse.Namespace) -> list[workload.Request]:
    """Requests spanning the workload's prompt lengths (its own seed: no prefix
    shared with the measured runs), to be sent one at a time."""
    pool = sorted(workload.from_args(args, rate=math.inf, seed=args.seed + 10_000), key=lambda r: len(r.prompt))
    n = min(args.idle_requests, len(pool))
    return [pool[round(i * (len(pool) - 1) / max(n - 1, 1))] for i in range(n)]


async def measure(name: str, target: str, args: argparse.Namespace) -> dict:
    send = senders.make(target, None, args.client, args.timeout)
    try:
        await warm_up(send, args.warmup)
        t0 = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - t0

        idle = []
        for r in idle_sample(args):  # one at a time: each is sent when it "arrives"
            r.arrival_s = clock()
            idle.append(await send_one(r, send, clock))
        runs = {}
        for i, rate in enumerate(args.rates):
            n = max(1, math.ceil(rate * args.duration)) if args.duration else None
            requests = workload.from_args(args, rate=rate, seed=args.seed + i, n=n)  # the same for every mode
            progress = ProgressLine(len(requests), f"{name} @ {rate:g} req/s", enabled=not args.no_progress)
            try:
                runs[f"{rate:g}"] = await run_open(requests, send, progress)
            finally:
                progress.close()
        return {"idle": idle, "runs": runs}
    finally:
        await send.close()


def _run_all(args: argparse.Namespace) -> dict:
    doc = {
        "command": command_line(),
        "workload": workload.describe(args),
        "local_prefill": args.local_prefill,
        "rates": args.rates,
        "modes": {},
    }
    for name in args.modes:
        svcs, setup = services(name, args)
        log = io.StringIO()
        print(f"{name}: starting ({setup})", flush=True)
        try:
            log_dir = Path(args.log_dir) / name if args.log_dir else None
            with Suite(
                services=svcs, out=log, log_dir=log_dir, env={"PDSERVE_LOCAL_PREFILL": args.local_prefill}
            ) as suite:
                result = asyncio.run(measure(name, suite.router_target, args))
        except BaseException:
            print(log.getvalue()[-4000:])  # the services' last lines say why
            raise
        doc["modes"][name] = {
            **setup,
            "idle": [r.as_dict() for r in result["idle"]],
            "runs": {k: [r.as_dict() for r in v] for k, v in result["runs"].items()},
        }
    return doc


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
    else:
        from pdserve.bench.limits import machine

        doc = {"machine": machine(), **_run_all(args)}
    records = {
        m: {
            "idle": [RequestRecord.from_dict(r) for r in d["idle"]],
            "runs": {k: [RequestRecord.from_dict(r) for r in v] for k, v in d["runs"].items()},
        }
        for m, d in doc["modes"].items()
    }
    objectives = report.objectives(records, args.slo_from, args.slo_ttft_factor, args.slo_tpot_factor)
    slo = objectives["slo"]
    doc["objectives"] = {**objectives, "slo": slo.as_dict()}
    doc["summaries"] = report.summaries(records, slo)
    doc["goals"] = report.goals(doc["summaries"])
    (out / "compare.json").write_text(json.dumps(doc, indent=1))
    table = report.markdown(doc)
    (out / "compare.md").write_text(table)
    print(table)
    written = plots.write_all(records, slo, doc["summaries"], out, args.plot_rate)
    print("wrote " + ", ".join(str(p) for p in [out / "compare.json", out / "compare.md", *written]))
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="request rates to sweep (req/s)")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of arrivals per rate (sets --num-requests to rate x duration)",
    )
    p.add_argument("--idle-requests", type=int, default=8, help="sent one at a time, for the objectives")
    p.add_argument("--slo-from", choices=MODES, default="colocated", help="whose idle run sets the objectives")
    p.add_argument("--slo-ttft-factor", type=float, default=3.0, help="TTFT objective: this x idle TTFT")
    p.add_argument("--slo-tpot-factor", type=float, default=2.0, help="TPOT objective: this x idle TPOT")
    p.add_argument("--chunk-tokens", type=int, default=512, help="per-step token budget of the chunked modes")
    p.add_argument("--unchunked-tokens", type=int, default=8192, help="colocated without chunking: the budget")
    p.add_argument("--prefill-cores", default=None, help="disaggregated: prefill worker cores (default: first half)")
    p.add_argument("--decode-cores", default=None, help="disaggregated: decode worker cores (default: second half)")
    p.add_argument(
        "--local-prefill",
        choices=["auto", "always", "never"],
        default="auto",
        help="disaggregated: the router's policy (auto: its cost model)",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache per worker")
    p.add_argument("--client", choices=["stub", "sdk"], default="stub")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--plot-rate", type=float, default=None, help="the rate the ITL CDF and timeline show (default: highest)"
    )
    p.add_argument("--port", type=int, default=54051)
    p.add_argument("--out", default="benchmarks/results/compare", help="directory for compare.json, .md and plots")
    p.add_argument("--from-json", default=None, help="only redo the report and plots from this compare.json")
    p.add_argument("--log-dir", default=None, help="keep each service's log in DIR/MODE/NAME.log")
    p.add_argument("--no-progress", action="store_true")
    workload.add_args(p, default_workload="mixed")
