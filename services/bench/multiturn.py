"""`pdserve bench multiturn`: later turns of a long conversation vs an empty cache.

Goal (issue #4): past 1,000 tokens of history, a turn's TTFT is at most 30% of the cold one's: the same
prompt with its first token changed, so no prefix matches anywhere. Results: docs/benchmarks.md ("Multi-turn").
"""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import time

from pdserve.client import AsyncClient
from pdserve.launcher import Suite


def _text_ids(n: int, salt: int) -> list[int]:
    return [200 + (salt * 7919 + i * 37) % 30000 for i in range(n)]


async def _ttft(client: AsyncClient, ids: list[int], max_tokens: int):
    t = time.perf_counter()
    first, tokens, usage, route = None, [], None, None
    async with client.generate(ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True) as s:
        async for c in s:
            if first is None and c.token_ids:
                first = (time.perf_counter() - t) * 1e3
            tokens += c.token_ids
            usage, route = c.usage or usage, c.route or route
    return first, tokens, usage, route


async def _conversation(target: str, turns: int, system: int, user: int, answer: int) -> list[dict]:
    rows = []
    async with AsyncClient(target, timeout=600) as client:
        await _ttft(client, _text_ids(64, 999), 2)  # warm up the path
        history = _text_ids(system, 0)
        for turn in range(turns):
            prompt = history + _text_ids(user, turn + 1)
            warm, answer_ids, usage, route = await _ttft(client, prompt, answer)
            # A first token no other prompt has: no prefix matches anywhere (not even earlier cold ones).
            cold_prompt = [40000 + turn] + prompt[1:]
            cold, _, _, _ = await _ttft(client, cold_prompt, 2)
            rows.append(
                {
                    "turn": turn + 1,
                    "prompt_tokens": len(prompt),
                    "ttft_ms": warm,
                    "cold_ttft_ms": cold,
                    "ratio": warm / cold,
                    "cached_tokens": usage.cached_tokens,
                    "disaggregated": bool(route and route.get("disaggregated")),
                }
            )
            history = prompt + answer_ids
    return rows


def main(args) -> int:
    log = io.StringIO()
    with Suite(
        mode="disaggregated",
        port=args.port,
        base_port=args.port + 10,
        kv_cache_gib=0.5,
        out=log,
        env={"PDSERVE_HTTP_PORT": "-1", "PDSERVE_LOCAL_PREFILL": args.local_prefill},
    ) as suite:
        rows = asyncio.run(
            _conversation(suite.router_target, args.turns, args.system_tokens, args.user_tokens, args.answer_tokens)
        )
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'path':>6} {'TTFT ms':>8} {'cold ms':>8} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['turn']:>4} {r['prompt_tokens']:>7} {r['cached_tokens']:>7} "
            f"{'disagg' if r['disaggregated'] else 'local':>6} {r['ttft_ms']:>8.0f} {r['cold_ttft_ms']:>8.0f} "
            f"{r['ratio']:>6.2f}"
        )
    long = [r for r in rows if r["prompt_tokens"] > 1000]
    summary = {}
    if long:
        ratio = statistics.median(r["ratio"] for r in long)
        hit = sum(r["cached_tokens"] for r in long) / sum(r["prompt_tokens"] for r in long)
        summary = {"median_ratio_past_1000": ratio, "hit_rate_past_1000": hit, "turns_past_1000": len(long)}
        print(f"turns past 1,000 tokens: median TTFT ratio {ratio:.2f} (goal <= 0.30), prefix hit rate {hit:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary, "local_prefill": args.local_prefill}, f, indent=2)
    return 0
