"""`pdserve bench ...`: each benchmark's command line, run lazily (most need the worker install)."""

from __future__ import annotations

import importlib
import sys

from pdserve.bench import cpu_isa
from pdserve.common.engine import precision
from pdserve.common.engine.config import QUANTIZATIONS


def _bench(name: str, args) -> int:
    from pdserve.bench.mooncake import TraceError

    try:
        return importlib.import_module(f"pdserve.bench.{name}").main(args)
    except TraceError as e:  # --trace: a missing or malformed file is a bad setting
        print(f"pdserve bench {args.bench}: {e}", file=sys.stderr)
        return 2


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    eng = bench_sub.add_parser("engine", help="engine speed against this machine's measured limits")
    eng.add_argument("--model", default=None)
    eng.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    eng.add_argument(
        "--dtype",
        default="auto",
        choices=precision.CHOICES,
        help="weights, KV, the matmul ceiling and the naive loop (auto: as a worker has it)",
    )
    eng.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="the engine's linear layers (int8: weight-only; the floor counts its bytes, the naive loop keeps --dtype)",
    )
    eng.add_argument("--json", default=None, help="also write the results here")
    eng.add_argument(
        "--as-cpu", choices=cpu_isa.CHOICES, default="native", help="avx2: on an AVX2-only CPU's code paths (re-runs)"
    )
    eng.set_defaults(func=lambda a: _bench("engine_bench", a))
    ttft = bench_sub.add_parser("ttft", help="idle TTFT, disaggregated vs colocated (real processes)")
    ttft.add_argument("--tokens", type=int, default=1000)
    ttft.add_argument("--reps", type=int, default=7)
    ttft.add_argument("--port", type=int, default=51051)
    ttft.add_argument("--json", default=None)
    ttft.set_defaults(func=lambda a: _bench("ttft", a))
    mt = bench_sub.add_parser("multiturn", help="multi-turn TTFT with the prefix cache vs cold")
    mt.add_argument("--turns", type=int, default=6)
    mt.add_argument("--system-tokens", type=int, default=400)
    mt.add_argument("--user-tokens", type=int, default=120)
    mt.add_argument("--answer-tokens", type=int, default=48)
    mt.add_argument(
        "--local-prefill",
        choices=["auto", "always", "never"],
        default="never",
        help="the router's policy (never: exercise the prefill workers and the KV store)",
    )
    mt.add_argument("--port", type=int, default=52051)
    mt.add_argument("--json", default=None)
    mt.set_defaults(func=lambda a: _bench("multiturn", a))
    cond = bench_sub.add_parser("conditional", help="is the router's local-prefill choice the faster path?")
    cond.add_argument("--short", type=int, default=24, help="short prompt tokens")
    cond.add_argument("--long", type=int, default=1000, help="long prompt tokens")
    cond.add_argument("--streams", type=int, default=4, help="streams keeping the decode worker busy")
    cond.add_argument("--port", type=int, default=53051)
    cond.add_argument("--json", default=None)
    cond.set_defaults(func=lambda a: _bench("conditional", a))
    from pdserve.bench import compare, control_plane, loadgen

    load = bench_sub.add_parser("load", help="open-loop load against a running router: latency, throughput, goodput")
    loadgen.add_args(load)
    load.set_defaults(func=lambda a: _bench("loadgen", a))
    cmp = bench_sub.add_parser("compare", help="goodput of colocated, chunked and disaggregated modes over rates")
    compare.add_args(cmp)
    cmp.set_defaults(func=lambda a: _bench("compare", a))
    cp = bench_sub.add_parser("control-plane", help="what the router adds, in front of a null engine")
    control_plane.add_args(cp)
    cp.set_defaults(func=lambda a: _bench("control_plane", a))
    from pdserve.bench import peer, tracing_overhead

    pr = bench_sub.add_parser("peer", help="pdserve beside vLLM, transformers serve and llama.cpp, same load")
    peer.add_args(pr)
    pr.set_defaults(func=lambda a: _bench("peer", a))

    tr = bench_sub.add_parser("tracing", help="end-to-end latency with tracing off vs on (default sampling)")
    tracing_overhead.add_args(tr)
    tr.set_defaults(func=lambda a: _bench("tracing_overhead", a))
