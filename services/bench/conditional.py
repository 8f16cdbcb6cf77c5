"""`pdserve bench conditional`: is the path the router picks the faster one?

One set of workers behind three routers (`--local-prefill always`, `never`, `auto`), idle with a short prompt
and with the decode worker busy and a long prompt; prints both forced costs and the auto router's choice.
How the cost is measured, and results: docs/benchmarks.md ("Conditional disaggregation").
"""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import subprocess
import time

import grpc

from pdserve.client import AsyncClient
from pdserve.launcher import Suite


def _ids(n: int, salt: int) -> list[int]:
    return [300 + (salt * 7919 + i * 41) % 30000 for i in range(n)]


async def _request(target: str, ids: list[int]) -> tuple[float, bool]:
    async with AsyncClient(target, timeout=600) as c:
        t, first, route = time.perf_counter(), None, None
        async with c.generate(ids, max_tokens=2, temperature=0.0, ignore_eos=True) as s:
            async for ch in s:
                if first is None and ch.token_ids:
                    first = (time.perf_counter() - t) * 1e3
                route = ch.route or route
    return first, bool(route and route["disaggregated"])


async def _stream_gaps(target: str, salt: int, stop: asyncio.Event, gaps: list[float]) -> None:
    async with AsyncClient(target, timeout=600) as c:
        async with c.generate(_ids(32, salt), max_tokens=2000, temperature=0.0, ignore_eos=True) as s:
            last = None
            async for ch in s:
                now = time.perf_counter()
                if last is not None and ch.token_ids:
                    gaps.append((now, (now - last) * 1e3))
                last = now
                if stop.is_set():
                    break


async def _busy_cost(background: str, target: str, ids: list[int], streams: int) -> dict:
    stop = asyncio.Event()
    gaps: list[list] = [[] for _ in range(streams)]
    tasks = [asyncio.create_task(_stream_gaps(background, 100 + i, stop, gaps[i])) for i in range(streams)]
    await asyncio.sleep(4.0)  # streams admitted and decoding
    t0 = time.perf_counter()
    ttft, disagg = await _request(target, ids)
    t1 = time.perf_counter()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    usual = statistics.median(g for gs in gaps for ts, g in gs if ts < t0)
    stall = sum(max([g for ts, g in gs if t0 <= ts <= t1 + 1.0] or [usual]) - usual for gs in gaps)
    return {"ttft_ms": ttft, "stall_ms": stall, "cost_ms": ttft + stall, "usual_itl_ms": usual, "disaggregated": disagg}


def _wait_serving(target: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        while not Suite._serving(channel):
            if time.monotonic() > deadline:
                raise TimeoutError(f"router {target} not serving")
            time.sleep(0.2)


def _router(suite: Suite, port: int, policy: str) -> subprocess.Popen:
    argv = [a for a in suite.services[-1].argv]  # the suite's own router command line
    argv[argv.index("--port") + 1] = str(port)
    return subprocess.Popen(
        [*argv, "--local-prefill", policy, "--http-port", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def main(args) -> int:
    out: dict = {}
    with Suite(
        mode="disaggregated",
        port=args.port,
        base_port=args.port + 10,
        kv_cache_gib=0.5,
        kvstore=False,
        out=io.StringIO(),
        env={"PDSERVE_HTTP_PORT": "-1"},
    ) as suite:
        routers = {p: _router(suite, args.port + 1 + i, p) for i, p in enumerate(("always", "never"))}
        try:
            targets = {p: f"127.0.0.1:{args.port + 1 + i}" for i, p in enumerate(("always", "never"))}
            for t in targets.values():
                _wait_serving(t, 120)
            targets["auto"] = suite.router_target

            async def run() -> None:
                short = {}
                for policy in ("always", "never", "auto"):
                    runs = [await _request(targets[policy], _ids(args.short, 10 * r + len(short))) for r in range(5)]
                    short[policy] = {"ttft_ms": statistics.median(t for t, _ in runs), "disaggregated": runs[-1][1]}
                out["idle_short"] = short
                busy = {}
                for i, policy in enumerate(("always", "never", "auto")):
                    busy[policy] = await _busy_cost(
                        targets["never"], targets[policy], _ids(args.long, 500 + i), args.streams
                    )
                out["busy_long"] = busy

            asyncio.run(run())
        finally:
            for p in routers.values():
                p.terminate()
                p.wait(10)
    s, b = out["idle_short"], out["busy_long"]
    print(
        f"idle, {args.short}-token prompt: TTFT local {s['always']['ttft_ms']:.0f} ms, "
        f"disaggregated {s['never']['ttft_ms']:.0f} ms; auto chose "
        f"{'disaggregated' if s['auto']['disaggregated'] else 'local'} ({s['auto']['ttft_ms']:.0f} ms)"
    )
    print(
        f"decode busy ({args.streams} streams), {args.long}-token prompt: cost (TTFT + stall on running streams) "
        f"local {b['always']['cost_ms']:.0f} ms (TTFT {b['always']['ttft_ms']:.0f} "
        f"+ stall {b['always']['stall_ms']:.0f}), "
        f"disaggregated {b['never']['cost_ms']:.0f} ms (TTFT {b['never']['ttft_ms']:.0f} "
        f"+ stall {b['never']['stall_ms']:.0f}); "
        f"auto chose {'disaggregated' if b['auto']['disaggregated'] else 'local'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
