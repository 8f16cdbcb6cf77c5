"""`pdserve bench control-plane`: what the router and gRPC add, with no model.

A real router in front of the null engine (null_worker.py): the p50 latency it adds, one request at a time,
and the most requests/s it sustains (goals, issue #6: <= 1 ms added; >= 1,000 requests/s).
How it is measured, cores included, and results: docs/benchmarks.md ("Control plane").
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import random
import sys
import time

from pdserve.bench import cores, router_start
from pdserve.bench.loadgen import command_line, run_closed, run_open, send_one
from pdserve.bench.metrics import RequestRecord, percentiles, summarize
from pdserve.bench.senders import DirectSender, SdkSender, StubSender
from pdserve.bench.workload import Request, poisson_arrivals
from pdserve.common import affinity
from pdserve.launcher import Suite, plan


def _row(recs: list[RequestRecord], cpu: dict[str, float]) -> dict:
    s = summarize(recs)
    return {
        "requests": s["requests"],
        "completed": s["completed"],
        "errors": s["errors"],
        "achieved_rps": s["throughput_rps"],
        "e2e_ms": s["e2e_ms"],
        "ttft_ms": s["ttft_ms"],
        "send_lag_ms_p99": s["send_lag_ms"]["p99"],
        "cpu_ms_per_request": cpu,
    }


async def measure(router: str, worker: str, args, pids: dict[str, int]) -> dict:
    prompt = [1000 + i for i in range(args.prompt_tokens)]
    senders = {
        "direct": DirectSender(worker),
        "router": StubSender(router, 60.0),
        "router_sdk": SdkSender(router, 60.0),
    }
    meter = cores.CpuMeter(pids)
    out: dict = {"added_latency": {}, "closed_loop": [], "open_loop": []}
    try:
        for send in senders.values():  # connections up, code paths warm
            for i in range(50):
                await send_one(Request(i, 0.0, prompt, 4), send, time.perf_counter)
        for max_tokens in args.latency_max_tokens:
            recs: dict[str, list[RequestRecord]] = {k: [] for k in senders}
            names = list(senders)
            for i in range(args.reps):
                for name in names[i % 3 :] + names[: i % 3]:  # rotate the order: drift hits all paths alike
                    recs[name].append(
                        await send_one(Request(i, 0.0, prompt, max_tokens), senders[name], time.perf_counter)
                    )
            row = {
                k: {
                    "e2e_ms": percentiles([r.e2e_ms for r in v if r.ok]),
                    "ttft_ms": percentiles([r.ttft_ms for r in v if r.ok]),
                    "errors": sum(not r.ok for r in v),
                }
                for k, v in recs.items()
            }
            p50 = {k: row[k]["e2e_ms"]["p50"] for k in row}
            row["added_e2e_ms_p50"] = p50["router"] - p50["direct"]
            row["added_ttft_ms_p50"] = row["router"]["ttft_ms"]["p50"] - row["direct"]["ttft_ms"]["p50"]
            row["sdk_over_stub_ms_p50"] = p50["router_sdk"] - p50["router"]
            out["added_latency"][str(max_tokens)] = row
            _say(
                f"max_tokens={max_tokens}: p50 end-to-end direct {p50['direct']:.2f} ms, via router "
                f"{p50['router']:.2f} ms (+{row['added_e2e_ms_p50']:.2f} ms; TTFT +{row['added_ttft_ms_p50']:.2f} ms), "
                f"SDK instead of the raw stub +{row['sdk_over_stub_ms_p50']:.2f} ms"
            )

        for max_tokens in args.load_max_tokens:
            await _load(senders, prompt, max_tokens, args, meter, out)
    finally:
        for send in senders.values():
            await send.close()
    return out


async def _load(senders: dict, prompt: list[int], max_tokens: int, args, meter: cores.CpuMeter, out: dict) -> None:
    """(b): closed loops at each concurrency (direct and via the router), then the open-loop sweep."""

    def make(i: int) -> Request:
        return Request(i, 0.0, prompt, max_tokens)

    for c in args.concurrency:
        for path in ("direct", "router"):
            meter.start()
            recs = await run_closed(make, senders[path], c, args.duration)
            row = {
                "max_tokens": max_tokens,
                "path": path,
                "concurrency": c,
                **_row(recs, meter.per_request_ms(len(recs))),
            }
            out["closed_loop"].append(row)
            _say(
                f"{max_tokens}-token requests, closed loop, {c:>3} streams, {path:>6}: "
                f"{row['achieved_rps']:6.0f} req/s, "
                f"p50 {row['e2e_ms']['p50']:.2f} ms, p99 {row['e2e_ms']['p99']:.2f} ms; CPU ms/request "
                + ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_ms_per_request"].items())
            )
    for rate in args.rates:
        times = poisson_arrivals(rate, max(1, round(rate * args.duration)), random.Random(int(rate)))
        meter.start()
        recs = await run_open([Request(i, t, prompt, max_tokens) for i, t in enumerate(times)], senders["router"])
        offered = len(times) / times[-1] if times[-1] > 0 else rate
        row = {
            "max_tokens": max_tokens,
            "rate": rate,
            "offered_rps": offered,
            **_row(recs, meter.per_request_ms(len(recs))),
        }
        row["sustained"] = (
            not row["errors"] and row["achieved_rps"] >= 0.95 * offered and row["e2e_ms"]["p99"] <= args.max_p99_ms
        )
        out["open_loop"].append(row)
        _say(
            f"{max_tokens}-token requests, open loop {rate:>6.0f} req/s offered: {row['achieved_rps']:6.0f} achieved, "
            f"p50 {row['e2e_ms']['p50']:.2f} ms, p99 {row['e2e_ms']['p99']:.2f} ms, send lag p99 "
            f"{row['send_lag_ms_p99']:.1f} ms, errors {row['errors'] or 0}: "
            f"{'sustained' if row['sustained'] else 'NOT sustained'}"
        )
        if not row["sustained"]:
            break  # latency has blown up: higher rates only queue longer


def summarize_goals(results: dict) -> dict:
    """The two figures the goals are about, per request size."""
    sizes = sorted({r["max_tokens"] for r in results["closed_loop"] + results["open_loop"]})
    return {
        "added_ms_p50": {k: v["added_e2e_ms_p50"] for k, v in results["added_latency"].items()},
        "sustained": {
            str(n): {
                "open_loop_rps": max(
                    (r["rate"] for r in results["open_loop"] if r["max_tokens"] == n and r["sustained"]), default=0.0
                ),
                "closed_loop_rps": max(
                    (
                        r["achieved_rps"]
                        for r in results["closed_loop"]
                        if r["max_tokens"] == n and r["path"] == "router"
                    ),
                    default=0.0,
                ),
            }
            for n in sizes
        },
        "goal_added_ms_p50": 1.0,
        "goal_rps": 1000.0,
    }


def _say(line: str) -> None:
    print(line, flush=True)


def _cores(args) -> dict[str, list[int] | None]:
    if args.no_pin:
        return {"router": None, "null_worker": None, "client": None}
    avail = affinity.available()
    router, rest = ([avail[0]], avail[1:]) if len(avail) > 1 else (avail, avail)
    pick = {"router": args.router_cores, "null_worker": args.worker_cores, "client": args.client_cores}
    default = {"router": router, "null_worker": rest, "client": rest}
    return {k: affinity.parse(v) if v else default[k] for k, v in pick.items()}


def main(args) -> int:
    pins = _cores(args)
    worker_port = args.port + 10
    # The router as deployed, metrics on (any free port); the null worker instead of a model worker.
    model, decode, router = plan(
        "colocated", 1, 1, port=args.port, base_port=worker_port, http_port=-1, kvstore=False, metrics_port=0
    )
    null = (sys.executable, "-m", "pdserve.bench.null_worker", "--port", str(worker_port), "--worker-id", "null-0")
    services = [
        model,
        dataclasses.replace(decode, name="null-0", argv=cores.pinned(null, pins["null_worker"])),
        dataclasses.replace(router, argv=cores.pinned(router.argv, pins["router"])),
    ]
    log = io.StringIO()
    try:
        with Suite(services=services, out=log, log_dir=args.log_dir) as suite:
            pids = {name: suite._procs[name].pid for name in ("router", "null-0")}  # Suite keeps its children by name
            _say(
                f"cores: {', '.join(f'{k} {v or affinity.available()}' for k, v in pins.items())} "
                f"(machine: {len(affinity.available())} usable)"
            )
            if pins["client"]:
                affinity.pin_process(pins["client"])
            results = asyncio.run(measure(suite.router_target, decode.address, args, pids))
            if args.start_reps:  # a second router, before the same null worker: its start alone
                other = plan(
                    "colocated", 1, 1, port=args.port + 20, base_port=worker_port, http_port=-1, kvstore=False
                )[2]
                results["router_start"] = router_start.measure(
                    cores.pinned(other.argv, pins["router"]), f"127.0.0.1:{args.port + 20}", args.start_reps
                )
    except BaseException:
        print(log.getvalue()[-4000:])  # the services' last lines say why
        raise
    summary = summarize_goals(results)
    _say(
        "router adds at p50: "
        + ", ".join(f"{v:.2f} ms ({k}-token requests)" for k, v in summary["added_ms_p50"].items())
        + " (goal <= 1 ms); sustains "
        + ", ".join(
            f"{k}-token requests {v['open_loop_rps']:.0f} req/s open loop, {v['closed_loop_rps']:.0f} closed loop"
            for k, v in summary["sustained"].items()
        )
        + " (goal >= 1,000)"
    )
    if start := results.get("router_start"):
        _say(
            f"router start: SERVING {start['serving_s_p50']:.2f} s after spawn (goal < 1.5), "
            f"{start['rss_mb_p50']:.0f} MB resident at idle (goal < 150), torch "
            f"{'mapped' if start['torch_mapped'] else 'not loaded'}; import and tokenizer "
            f"{start['import_and_tokenizer_s_p50']:.2f} s (medians of {args.start_reps})"
        )
    if args.json:
        from pdserve.bench.limits import machine

        doc = {
            "command": command_line(),
            "machine": machine(),
            "cores": pins,
            "prompt_tokens": args.prompt_tokens,
            "load_max_tokens": args.load_max_tokens,
            "max_p99_ms": args.max_p99_ms,
            "summary": summary,
            **results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


def add_args(p) -> None:
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument(
        "--latency-max-tokens",
        type=int,
        nargs="+",
        default=[1, 16],
        help="(a) output tokens per request, one measurement each",
    )
    p.add_argument("--reps", type=int, default=300, help="(a) requests per path and setting")
    p.add_argument("--load-max-tokens", type=int, nargs="+", default=[1, 16], help="(b) output tokens per request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="(b) closed-loop streams")
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[250, 500, 1000, 1500],
        help="(b) open-loop req/s, ascending; the sweep stops at the first rate not sustained",
    )
    p.add_argument("--duration", type=float, default=5.0, help="(b) seconds per closed-loop run / open-loop rate")
    p.add_argument("--max-p99-ms", type=float, default=100.0, help="(b) a sustained rate keeps p99 within this")
    p.add_argument("--router-cores", default=None, help="e.g. 0 or 0-1 (default: the first usable core)")
    p.add_argument("--worker-cores", default=None, help="null worker cores (default: the others)")
    p.add_argument("--client-cores", default=None, help="this client's cores (default: the others)")
    p.add_argument("--no-pin", action="store_true", help="let every process use every core")
    p.add_argument("--start-reps", type=int, default=3, help="router starts to time (0: none)")
    p.add_argument("--port", type=int, default=55051)
    p.add_argument("--log-dir", default=None, help="keep the router's and null worker's logs in DIR/NAME.log")
    p.add_argument("--json", default=None)
