"""`pdserve bench ttft`: time to first token at idle, disaggregated vs colocated.

Goal (issue #3): with the transfer overlapped, a 1,000-token prompt's TTFT disaggregated is within 10% of
colocated. Real processes per mode, a fresh prompt each time. Results: docs/benchmarks.md ("Idle TTFT").
"""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import time

from pdserve.client import AsyncClient
from pdserve.launcher import Suite


def _prompt(n: int, salt: int) -> list[int]:
    return [100 + (salt * 7919 + i * 31) % 40000 for i in range(n)]


async def _measure(target: str, tokens: int, reps: int) -> dict:
    client_ms, server_ms, transfer_ms = [], [], []
    async with AsyncClient(target, timeout=300) as client:
        await client.complete(_prompt(tokens, 10_000), max_tokens=2, temperature=0.0)  # warm up
        for i in range(reps):
            t = time.perf_counter()
            first = None
            # salt 0 is the workers' own warm-up prompt (AsyncEngine._warm_up), left in their prefix cache
            prompt = _prompt(tokens, i + 1)
            async with client.generate(prompt, max_tokens=2, temperature=0.0, ignore_eos=True) as s:
                async for chunk in s:
                    if first is None and chunk.token_ids:
                        first = time.perf_counter() - t
                    if chunk.timing:
                        server_ms.append(chunk.timing.ttft_ms)
                        transfer_ms.append(chunk.timing.kv_transfer_ms)
            client_ms.append(first * 1e3)
    return {
        "ttft_ms_median": statistics.median(client_ms),
        "ttft_ms_all": client_ms,
        "router_ttft_ms_median": statistics.median(server_ms),
        "kv_wait_after_first_token_ms_median": statistics.median(transfer_ms),
    }


def main(args) -> int:
    results = {"prompt_tokens": args.tokens, "reps": args.reps}
    for mode in ("colocated", "disaggregated"):
        log = io.StringIO()
        # Force the disaggregated path (the cost model would prefill locally at idle).
        with Suite(
            mode=mode,
            port=args.port,
            base_port=args.port + 10,
            kv_cache_gib=0.5,
            out=log,
            env={"PDSERVE_LOCAL_PREFILL": "never", "PDSERVE_HTTP_PORT": "0"},
        ) as suite:
            results[mode] = asyncio.run(_measure(suite.router_target, args.tokens, args.reps))
        print(
            f"{mode:>14}: TTFT median {results[mode]['ttft_ms_median']:.0f} ms "
            f"(router-measured {results[mode]['router_ttft_ms_median']:.0f} ms) over {args.reps} prompts "
            f"of {args.tokens} tokens",
            flush=True,
        )
    ratio = results["disaggregated"]["ttft_ms_median"] / results["colocated"]["ttft_ms_median"]
    results["ratio"] = ratio
    print(f"disaggregated / colocated TTFT = {ratio:.3f} (goal <= 1.10)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
