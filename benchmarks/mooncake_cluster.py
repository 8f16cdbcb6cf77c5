"""The public Mooncake conversation trace on a 16-worker cluster, by simulation (issue #18 item 6).

    .venv/bin/python benchmarks/mooncake_cluster.py --trace conversation_trace.jsonl \
        [--requests 1500] [--workers 16] [--json benchmarks/results/mooncake_cluster.json]

The trace is FAST25-release/traces/conversation_trace.jsonl of github.com/kvcache-ai/Mooncake
(12,031 requests over 59 minutes; prompts of 12,035 tokens on average). Each worker is this
machine (its cached profile, every core a worker's thread), running SmolLM2-135M-Instruct:
prompts are cut to its 8,192-token window less the output, as `pdserve bench` cuts them. The
trace's own arrival pattern (bursts included) is replayed faster or slower to find each
topology's capacity: the highest average rate at which 90% of requests meet the objectives.
Not modelled (docs/planning.md): the prefix cache, whose reuse this trace is rich in, and
KV capacity. Every disaggregated split of the workers (or --prefill-counts) is simulated beside
all of them colocated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pdserve.bench.mooncake import read_trace
from pdserve.bench.workload import from_trace
from pdserve.planner import measure
from pdserve.planner.planner import Objectives, capacity, summary
from pdserve.planner.simulator import Topology, simulate

CONTEXT = 8192  # SmolLM2's max_position_embeddings
MAX_OUTPUT = 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", required=True)
    parser.add_argument("--requests", type=int, default=1500, help="the trace's first N requests")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument(
        "--prefill-counts",
        type=int,
        nargs="*",
        default=None,
        help="the disaggregated splits to simulate, by prefill workers (default: every one)",
    )
    parser.add_argument("--slo-ttft-ms", type=float, default=60_000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=150.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    records = read_trace(args.trace)[: args.requests]
    span_s = (records[-1].timestamp_ms - records[0].timestamp_ms) / 1000
    trace_rate = len(records) / span_s
    requests = from_trace(records, max_prompt=CONTEXT - MAX_OUTPUT, max_output=MAX_OUTPUT)
    profile = measure.load_or_measure(None, quick=False)
    threads = len(os.sched_getaffinity(0))
    goal = Objectives(args.slo_ttft_ms, args.slo_tpot_ms)

    def workload(rate: float):  # the trace's arrivals, compressed or stretched to `rate` on average
        scale = trace_rate / rate
        return [type(r)(r.index, r.arrival_s * scale, r.prompt, r.max_tokens, r.kind) for r in requests]

    n = args.workers
    topologies = [Topology("colocated", 0, n, threads, args.chunk)]
    for local_prefill in ("auto", "never"):  # the router's cost model, or every prompt on a prefill worker
        topologies += [
            Topology("disaggregated", p, n - p, threads, args.chunk, local_prefill=local_prefill)
            for p in args.prefill_counts or range(1, n)
        ]
    mean_prompt = sum(len(r.prompt) for r in requests) / len(requests)
    print(
        f"{len(requests)} requests of the trace ({trace_rate:.2f} req/s there; prompts {mean_prompt:.0f} tokens "
        f"on average after the cut); {goal}; profile {profile.hardware}",
        flush=True,
    )
    rows = []
    for t in topologies:
        t0 = time.perf_counter()
        score = capacity(t, profile, workload, goal, low=0.005, high=8.0)
        at = summary(simulate(t, profile, workload(score.capacity_rps or 0.005)), goal)
        rows.append(
            {
                "topology": str(t),
                "mode": t.mode,
                "prefill": t.prefill,
                "decode": t.decode,
                "local_prefill": t.local_prefill,
                "capacity_rps": score.capacity_rps,
                **{
                    k: at[k]
                    for k in ("attainment", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "remote_share")
                },
                "simulated_s": time.perf_counter() - t0,
            }
        )
        r = rows[-1]
        print(
            f"{r['topology']:<42} capacity {r['capacity_rps']:.3f} req/s  TTFT p99 {r['ttft_ms_p99'] / 1e3:.1f} s  "
            f"TPOT p50/p99 {r['tpot_ms_p50'] or 0:.0f}/{r['tpot_ms_p99'] or 0:.0f} ms  "
            f"remote {r['remote_share']:.0%}  ({r['simulated_s']:.0f} s)",
            flush=True,
        )
    best = {
        m: max((r for r in rows if r["mode"] == m), key=lambda r: r["capacity_rps"])
        for m in ("colocated", "disaggregated")
    }
    ratio = (
        best["disaggregated"]["capacity_rps"] / best["colocated"]["capacity_rps"]
        if best["colocated"]["capacity_rps"]
        else float("inf")
    )
    print(f"best disaggregated {best['disaggregated']['topology']}: {ratio:.2f}x the colocated capacity")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "trace": "kvcache-ai/Mooncake FAST25-release/traces/conversation_trace.jsonl",
                    "requests": len(requests),
                    "trace_rate_rps": trace_rate,
                    "objectives": str(goal),
                    "profile": profile.hardware,
                    "context_cut": CONTEXT,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
