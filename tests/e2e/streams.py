"""A greedy stream that records its tokens as they arrive, for fault tests to act mid-stream."""

from __future__ import annotations


async def greedy_stream(client, ids: list[int], tokens: int, seen: list[int]):
    """Stream `tokens` greedy tokens (ignore_eos) of `ids` into `seen`; the last message."""
    last = None
    async with client.generate(ids, max_tokens=tokens, ignore_eos=True, temperature=0.0) as stream:
        async for last in stream:
            seen.extend(last.token_ids)
    return last
