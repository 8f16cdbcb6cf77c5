"""Leases: every reservation and pinned block has an owner and an expiry, so
hundreds of requests with random client cancellations and a worker killed
halfway leave every pool of every surviving service back to full."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from pdserve.common.errors import NotFoundError
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import text_of_tokens
from tests.service.suite import inprocess_suite

REQUESTS = 200
CONCURRENCY = 12


async def _one(stub, ids, rid, max_tokens, cancel_after_s):
    """'finished', 'cancelled', or the unexpected error as 'CODE: details'."""
    call = stub.Generate(rpb.GenerateRequest(
        request_id=rid, token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)))
    if cancel_after_s is not None:
        asyncio.get_running_loop().call_later(cancel_after_s, call.cancel)
    try:
        last = None
        async for last in call:
            pass
        assert last is not None and last.finish_reason != pb.FINISH_REASON_UNSPECIFIED, rid  # never an empty success
        assert last.usage.completion_tokens == max_tokens
        return "finished"
    except asyncio.CancelledError:
        return "cancelled"
    except grpc.aio.AioRpcError as e:
        if e.code() is grpc.StatusCode.CANCELLED and cancel_after_s is not None:
            return "cancelled"
        return f"{e.code().name}: {e.details()}"


async def test_random_cancellations_and_a_killed_worker_leave_every_pool_full(smollm2):
    _, _, tokenizer = smollm2
    rng = random.Random(7)
    async with inprocess_suite(smollm2, prefill_workers=2, decode_workers=2, store_blocks=64,
                               decode_kw={"use_store": True, "lease_ms": 3000},
                               prefill_kw={"transfer_timeout_s": 3.0}, router_kw={"max_retries": 3}) as suite:
        gate = asyncio.Semaphore(CONCURRENCY)
        killed: list[str] = []

        async def run(i: int) -> str:
            async with gate:
                if i == REQUESTS // 2:  # halfway: a decode worker crashes with streams in flight
                    victim = suite.decode[0]
                    await victim.server.stop(grace=0)
                    killed.append(victim.worker_id)
                ids = text_of_tokens(tokenizer, rng.randint(4, 96), offset=rng.randint(0, 5))
                cancel = rng.uniform(0.0, 0.4) if rng.random() < 0.3 else None
                return await _one(suite.stub, ids, f"r{i}", rng.randint(1, 6), cancel)

        outcomes = await asyncio.gather(*(run(i) for i in range(REQUESTS)))
        assert set(outcomes) <= {"finished", "cancelled"}, [o for o in outcomes if o not in ("finished", "cancelled")]
        assert outcomes.count("finished") > REQUESTS // 2 and outcomes.count("cancelled") > 10

        survivors = [rt for rt in suite.decode + suite.prefill if rt.worker_id not in killed]
        # Frees are asynchronous (aborted streams, finishing sends, store writes); a reservation
        # whose Release raced ahead of it is freed by its 3 s lease, a push to the dead worker
        # gives up after 3 s.
        for _ in range(400):
            stats = [rt.engine.engine.stats() for rt in survivors]
            store = await suite.store_stats()
            if (all(s.free_blocks == s.total_blocks and s.reserved == s.held == s.running == s.waiting == 0
                    for s in stats) and store.active_leases == 0):
                break
            await asyncio.sleep(0.05)
        assert all(s.free_blocks == s.total_blocks for s in stats), stats
        assert all(s.reserved == s.held == s.running == s.waiting == 0 for s in stats), stats
        assert store.active_leases == 0
        assert suite.router.router.inflight == 0
        decode_stats = [await stub.GetStats(dpb.GetDecodeStatsRequest()) for stub in suite.worker_stubs()[1:2]]
        assert decode_stats[0].reservations_active == 0


async def test_a_release_that_overtakes_its_reserve_frees_the_reservation_as_it_is_made(smollm2):
    # The router releases as soon as its caller is gone, and that Release can reach the
    # decode worker before the Reserve it undoes: the blocks must not wait out the lease.
    async with inprocess_suite(smollm2) as suite:
        worker = suite.decode_workers[0]
        assert await worker.release("r-early") is False  # nothing to free yet
        with pytest.raises(NotFoundError, match="released before it was made"):
            await worker.reserve("r-early", list(range(40)), b"", lease_ms=600_000)
        stats = worker.engine.engine.stats()
        assert stats.reserved == 0 and stats.free_blocks == stats.total_blocks
        assert worker.active_reservations == 0
        r = await worker.reserve("r-next", list(range(40)), b"", lease_ms=600_000)  # others unaffected
        assert r.dest_block_ids and worker.active_reservations == 1
        assert await worker.release("r-next") is True
