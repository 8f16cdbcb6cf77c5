"""Router, prefill, decode and KV store each on its own "host" (a network
namespace): KV crosses a real virtual network, and a dead decode host or a
cut prefill link costs the client nothing.

The tests share one suite (conftest.py). The decode kill leaves one decode
worker for the tests after it; each test works with one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from pdserve.client import AsyncClient, Completion
from tests.engine.prompts import PARAGRAPHS

pytestmark = pytest.mark.multihost

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def prompt(offset: int, paragraphs: int) -> str:
    """Text no other request sends (no prefix-cache hits across requests)."""
    return "".join(f"Part {offset}.{i}: {PARAGRAPHS[(offset + i) % len(PARAGRAPHS)]}" for i in range(paragraphs))


async def eventually(check, timeout: float, what: str):
    """Poll the async `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.2)
    return result


async def through_every_prefiller(client: AsyncClient, cluster, offset: int, **params) -> dict[str, Completion]:
    """Concurrent requests (the router spreads them by load) until every prefill
    worker has computed one; a completion by prefill worker id."""
    prefillers = cluster.names("prefill")
    seen: dict[str, Completion] = {}
    for round_ in range(4):
        batch = await asyncio.gather(
            *(client.complete(prompt(offset + 10 * round_ + i, 8), **params) for i in range(len(prefillers)))
        )
        for c in batch:
            seen.setdefault(c.route["prefill_worker_id"], c)
        if set(seen) >= set(prefillers):
            return seen
    raise AssertionError(f"the router never sent a request to {set(prefillers) - set(seen)}")


async def test_kv_cache_crosses_the_virtual_network(cluster):
    stats_before = {n: await cluster.decode_stats(n) for n in cluster.names("decode")}
    nic_before = {n: cluster.net.counters(n) for n in cluster.net.address}
    async with AsyncClient(cluster.suite.router_target, timeout=300) as client:
        done = await through_every_prefiller(client, cluster, 100, max_tokens=8, **GREEDY)
    assert all(c.route["disaggregated"] and len(c.token_ids) == 8 for c in done.values())
    received = sum(
        [
            (await cluster.decode_stats(n)).kv_bytes_received - before.kv_bytes_received
            for n, before in stats_before.items()
        ]
    )
    assert received > 0
    # Every KV byte came in through a decode host's network interface, and went out through a prefill host's.
    grew = {n: {k: v - nic_before[n][k] for k, v in cluster.net.counters(n).items()} for n in cluster.net.address}
    assert sum(grew[n]["rx_bytes"] for n in cluster.names("decode")) >= received
    assert sum(grew[n]["tx_bytes"] for n in cluster.names("prefill")) >= received


async def test_killed_decode_host_migrates_the_stream(cluster):
    text = prompt(200, 6)
    async with AsyncClient(cluster.suite.router_target, timeout=300) as client:
        expected = await client.complete(text, max_tokens=48, **GREEDY)
        assert len(expected.token_ids) == 48
        got: list[int] = []
        killed = last = None
        async with client.generate(text, max_tokens=48, **GREEDY) as stream:
            async for last in stream:
                got += last.token_ids
                if killed is None and len(got) >= 8:
                    killed = await _serving_decoder(cluster)
                    for pid in cluster.net.pids(killed):  # the whole "host" dies: kill -9
                        os.kill(pid, signal.SIGKILL)
        assert killed is not None, "the stream ended before a decode worker could be killed"
        assert got == expected.token_ids  # nothing lost, nothing repeated, greedy unchanged
        assert last.finish_reason == "length" and last.usage.completion_tokens == 48
        assert last.route["decode_worker_id"] != killed
        assert (await cluster.healthy())[killed] is False


async def _serving_decoder(cluster) -> str:
    """The decode worker with a sequence running (the stream's)."""
    for name in cluster.names("decode"):
        if (await cluster.load(name)).running_seqs:
            return name
    raise AssertionError("no decode worker is running the stream")


async def test_cut_prefill_link_fails_over_and_heals(cluster):
    text = prompt(300, 40)  # ~1,000 tokens not seen before: a prefill that lasts long enough to cut
    prefillers = cluster.names("prefill")
    async with AsyncClient(cluster.suite.router_target, timeout=300) as client:
        # Every prefill host has moved KV before the cut (tests/multihost/test_data_plane.py
        # shows why a first transfer during an outage is a different, known failure).
        await through_every_prefiller(client, cluster, 310, max_tokens=2, **GREEDY)
        request = asyncio.create_task(client.complete(text, max_tokens=12, **GREEDY))

        async def busy_prefiller():
            for name in prefillers:
                load = await cluster.load(name)
                if load.running_seqs or load.waiting_seqs:
                    return name
            return None

        victim = await eventually(busy_prefiller, 60, "a prefill worker takes the request")
        cluster.net.set_link(victim, up=False)  # mid-prefill: its answer and its KV push stall
        try:
            faulted = await request
            assert faulted.finish_reason == "length" and len(faulted.token_ids) == 12
            assert faulted.route["prefill_worker_id"] not in ("", victim)
            assert (await cluster.healthy())[victim] is False
        finally:
            cluster.net.set_link(victim, up=True)
        await eventually(lambda: _healthy(cluster, victim), 60, f"{victim} healthy again after its link is back")
        # Healthy means it serves again: every prefill host computes a request, KV and all.
        again = await through_every_prefiller(client, cluster, 320, max_tokens=4, **GREEDY)
        assert again[victim].finish_reason == "length" and len(again[victim].token_ids) == 4
        assert (await client.complete(text, max_tokens=12, **GREEDY)).token_ids == faulted.token_ids


async def _healthy(cluster, name: str) -> bool:
    return (await cluster.healthy()).get(name, False)
