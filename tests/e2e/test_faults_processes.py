"""Worker processes that crash, hang or are told to stop, under live traffic.

A SIGKILLed or SIGSTOPped decode worker's stream migrates to another decode
worker with no token lost or repeated; a SIGTERMed one finishes its streams (drain) while new
requests go elsewhere. Real processes, real signals."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from pdserve.client import AsyncClient
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2_grpc
from tests.e2e.streams import greedy_stream
from tests.engine.prompts import text_of_tokens
from tests.polling import settles

TOKENS = 48


KEEPALIVE_S = 2.0  # the router's pings to workers (10 s by default): a frozen worker is found within 2x this


@pytest.fixture(scope="module")
def suite(start_suite):
    return start_suite("disaggregated", decode=3, env={"PDSERVE_WORKER_KEEPALIVE_S": str(KEEPALIVE_S)})


async def _busy_decoder(suite, alive: set[str]) -> str:
    """The decode worker running a sequence now."""

    async def busy() -> str | None:
        for s in suite.services:
            if s.name in alive:
                async with grpc.aio.insecure_channel(s.address) as ch:
                    load = (await decode_pb2_grpc.DecodeStub(ch).GetLoad(pb.GetLoadRequest(), timeout=5)).load
                if load.running_seqs:
                    return s.name
        return None

    name = await settles(busy, timeout=30, interval=0.02)
    assert name, "no decode worker is running the request"
    return name


async def _tokens_seen(seen: list[int], n: int, call: asyncio.Task) -> None:
    """Until the stream has delivered `n` tokens (or ended, which the caller's await reports)."""
    assert await settles(lambda: len(seen) >= n or call.done(), timeout=120, interval=0.01), seen


def _decoders(suite) -> set[str]:
    return {s.name for s in suite.services if s.name.startswith("decode")}


async def _migrated_stream(suite, tokenizer, offset: int, fault, within_s: float = 60) -> None:
    """Stream a greedy request, hit its decode worker with `fault(name)` mid-stream, and check
    the client still gets exactly the unfaulted tokens, finished on another decode worker."""
    ids = text_of_tokens(tokenizer, 60, offset=offset)
    async with AsyncClient(suite.router_target, timeout=120) as client:
        expected = (await client.complete(ids, max_tokens=TOKENS, ignore_eos=True, temperature=0.0)).token_ids
        seen: list[int] = []
        call = asyncio.create_task(greedy_stream(client, ids, TOKENS, seen))
        await _tokens_seen(seen, 8, call)
        victim = await _busy_decoder(suite, _decoders(suite))
        undo = fault(victim)
        try:
            result = await asyncio.wait_for(call, within_s)
        finally:
            undo()
    assert seen == expected  # greedy: nothing lost, nothing repeated
    assert result.route["decode_worker_id"] != victim and result.usage.completion_tokens == TOKENS


async def test_a_frozen_decode_worker_s_stream_continues_on_another_once_its_pings_go_unanswered(suite, smollm2):
    # SIGSTOP: the process and its sockets stay, nothing answers, no reset comes (like a cut
    # link, or a hung host); without keepalive the stream would wait out its 600 s deadline.
    def freeze(victim):
        suite.signal(victim, signal.SIGSTOP)
        return lambda: suite.signal(victim, signal.SIGCONT)

    await _migrated_stream(suite, smollm2[2], 23, freeze)


async def test_a_killed_decode_worker_s_stream_continues_on_another_with_the_same_tokens(suite, smollm2):
    def kill(victim):
        suite.signal(victim, signal.SIGKILL).wait(10)
        return lambda: None

    await _migrated_stream(suite, smollm2[2], 21, kill)


async def test_sigterm_drains_a_decode_worker_while_new_requests_go_elsewhere(suite, smollm2):
    _, _, tokenizer = smollm2
    alive = {n for n in _decoders(suite) if suite._procs[n].poll() is None}
    ids = text_of_tokens(tokenizer, 60, offset=22)
    async with AsyncClient(suite.router_target, timeout=120) as client:
        seen: list[int] = []
        call = asyncio.create_task(greedy_stream(client, ids, TOKENS, seen))
        await _tokens_seen(seen, 4, call)
        draining = await _busy_decoder(suite, alive)
        proc = suite.signal(draining, signal.SIGTERM)
        during = [
            await client.complete(text_of_tokens(tokenizer, 20, offset=30 + i), max_tokens=4, temperature=0.0)
            for i in range(3)
        ]
        result = await call
        assert await asyncio.to_thread(proc.wait, 30) == 0  # it exited cleanly once drained
    assert result.route["decode_worker_id"] == draining  # finished where it started: drained, not migrated
    assert len(seen) == TOKENS
    assert all(r.route["decode_worker_id"] != draining and len(r.token_ids) == 4 for r in during)
