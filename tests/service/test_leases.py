"""Leases: every reservation and pinned block has an owner and an expiry, so
hundreds of requests with random client cancellations and a worker's server
stopped halfway leave every pool of every surviving service back to full."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
import torch

from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import NotFoundError
from pdserve.common.transfer import UcxKVSender
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import text_of_tokens
from tests.polling import settles
from tests.service.suite import inprocess_suite

REQUESTS = 200
CONCURRENCY = 12


async def _one(stub, ids, rid, max_tokens, cancel_after_s):
    """'finished', 'cancelled', or the unexpected error as 'CODE: details'."""
    call = stub.Generate(
        rpb.GenerateRequest(
            request_id=rid,
            token_ids=pb.TokenIds(ids=ids),
            sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )
    )
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


async def test_random_cancellations_and_a_stopped_worker_leave_every_pool_full(smollm2):
    _, _, tokenizer = smollm2
    rng = random.Random(7)
    async with inprocess_suite(
        smollm2,
        prefill_workers=2,
        decode_workers=2,
        store_blocks=64,
        decode_kw={"use_store": True, "lease_ms": 3000},
        prefill_kw={"transfer_timeout_s": 3.0},
        router_kw={"max_retries": 3},
    ) as suite:
        # Cancels land within twice the time one request takes alone on this machine, measured
        # here: most fall while their request runs (twelve at a time take longer than one alone).
        t0 = time.perf_counter()
        assert await _one(suite.stub, text_of_tokens(tokenizer, 96), "alone", 6, None) == "finished"
        cancel_within_s = 2 * (time.perf_counter() - t0)
        gate = asyncio.Semaphore(CONCURRENCY)
        killed: list[str] = []

        async def run(i: int) -> str:
            async with gate:
                if i == REQUESTS // 2:  # halfway: a decode worker's server stops with streams in flight
                    victim = suite.decode[0]
                    await victim.server.stop(grace=0)
                    killed.append(victim.worker_id)
                ids = text_of_tokens(tokenizer, rng.randint(4, 96), offset=rng.randint(0, 5))
                cancel = rng.uniform(0.0, cancel_within_s) if rng.random() < 0.3 else None
                return await _one(suite.stub, ids, f"r{i}", rng.randint(1, 6), cancel)

        outcomes = await asyncio.gather(*(run(i) for i in range(REQUESTS)))
        assert set(outcomes) <= {"finished", "cancelled"}, [o for o in outcomes if o not in ("finished", "cancelled")]
        assert outcomes.count("finished") > REQUESTS // 2 and outcomes.count("cancelled") > 10

        survivors = [rt for rt in suite.decode + suite.prefill if rt.worker_id not in killed]
        # Frees are asynchronous (aborted streams, finishing sends, store writes; a push to
        # the dead worker gives up after 3 s). No lease runs out in this window: the router
        # asks for one as long as its Prefill timeout, so every free here is a real release.

        async def all_free() -> bool:
            stats = [rt.engine.stats() for rt in survivors]
            return (
                all(
                    s.free_blocks == s.total_blocks and s.reserved == s.held == s.running == s.waiting == 0
                    for s in stats
                )
                and (await suite.store_stats()).active_leases == 0
            )

        await settles(all_free, timeout=30)
        stats = [rt.engine.stats() for rt in survivors]
        store = await suite.store_stats()
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
            await worker.reserve("r-early", list(range(40)), worker.spec.fingerprint, lease_ms=600_000)
        stats = worker.engine.stats()
        assert stats.reserved == 0 and stats.free_blocks == stats.total_blocks
        assert worker.active_reservations == 0
        r = await worker.reserve(
            "r-next", list(range(40)), worker.spec.fingerprint, lease_ms=600_000
        )  # others unaffected
        assert r.dest_block_ids and worker.active_reservations == 1
        assert await worker.release("r-next") is True


async def test_a_transfer_that_cannot_be_fenced_quarantines_its_blocks_until_it_is(smollm2, monkeypatch):
    # A sender that died mid-message: its receive may still write, so the blocks are not reused
    # until it completes after all; the reservation stops counting against the queue at once
    # (max_queue refused everything once enough of them had piled up).
    async with inprocess_suite(smollm2) as suite:
        worker = suite.decode_workers[0]
        r = await worker.reserve("r-unfenced", list(range(40)), worker.spec.fingerprint, lease_ms=600_000)
        fence = asyncio.get_running_loop().create_future()

        async def cannot_fence(transfer_id: str) -> bool:
            return False

        monkeypatch.setattr(worker.receiver, "cancel", cannot_fence)
        monkeypatch.setattr(worker.receiver, "when_fenced", lambda transfer_id: fence)
        assert await worker.release("r-unfenced") is True
        await asyncio.sleep(0.2)
        stats = worker.engine.stats()
        assert stats.reserved == 0 and worker.active_reservations == 0
        assert stats.quarantined_blocks == len(r.dest_block_ids)
        assert stats.free_blocks == stats.total_blocks - len(r.dest_block_ids)
        assert worker.engine.max_model_len == (stats.total_blocks - len(r.dest_block_ids)) * 16

        fence.set_result(None)  # its receives completed: nothing can land any more
        back = await settles(lambda: worker.engine.stats().free_blocks == stats.total_blocks)
        assert back and worker.engine.stats().quarantined_blocks == 0
        assert worker.engine.max_model_len == stats.total_blocks * 16


async def test_a_ucx_cancel_with_no_time_to_drain_gives_its_blocks_back_once_its_receives_complete(
    smollm2, monkeypatch
):
    # The real receiver and its watch: no time to drain, so the cancel reports the blocks unfenced;
    # the receives complete a moment later (the 0-byte messages the cancel sent itself), and the
    # quarantine ends.
    async with inprocess_suite(smollm2) as suite:
        worker = suite.decode_workers[0]
        total = worker.engine.stats().total_blocks
        r = await worker.reserve("r-slow", list(range(40)), worker.spec.fingerprint, lease_ms=600_000)
        monkeypatch.setattr(worker.receiver, "_drain_timeout", 0.0)
        assert await worker.release("r-slow") is True
        assert worker.engine.stats().quarantined_blocks == len(r.dest_block_ids)
        assert await settles(lambda: worker.engine.stats().free_blocks == total, timeout=10)
        assert worker.engine.stats().quarantined_blocks == 0 and worker.receiver._parked == {}


async def test_a_client_gone_just_as_decode_is_called_leaves_no_reservation_behind(smollm2):
    # Right after the first token the router opens the Decode stream; a cancel a few loop
    # turns later can reach the worker before the call does, or the call never leaves.
    # The reservation stays the router's to release until the stream answers, so the
    # blocks come back at once, not when the (long) lease runs out.
    _, _, tokenizer = smollm2
    async with inprocess_suite(smollm2, decode_kw={"lease_ms": 600_000}) as suite:
        engine = suite.decode[0].engine

        def freed() -> bool:
            s = engine.stats()
            return s.reserved == 0 and s.free_blocks == s.total_blocks

        left: list[int] = []
        for turns in range(10):
            call = suite.stub.Generate(
                rpb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=text_of_tokens(tokenizer, 40, offset=turns)),
                    sampling=pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                )
            )
            await call.__aiter__().__anext__()  # the first token: Decode is about to be called
            for _ in range(turns):
                await asyncio.sleep(0)
            call.cancel()
            if not await settles(freed, timeout=10):  # against a 600 s lease
                left.append(turns)
                for rid in list(suite.decode_workers[0]._leases):  # clean slate for the next turn
                    await suite.decode_workers[0].release(rid)
        assert left == [], f"reservations left behind when cancelled {left} loop turns after the first token"
        assert suite.router.router.inflight == 0


async def test_a_decode_cancelled_while_waiting_to_join_the_batch_frees_its_blocks(smollm2):
    # Once the KV has landed, decode() stops the lease's clock and waits for the engine's
    # running step to end before the request joins the batch. A cancel in that wait must
    # free the blocks: no lease would sweep them any more.
    async with inprocess_suite(smollm2) as suite:
        worker = suite.decode_workers[0]
        engine = worker.engine
        r = await worker.reserve("r-admit", list(range(40)), worker.spec.fingerprint, lease_ms=600_000)
        blocks = torch.zeros(len(r.dest_block_ids), r.ticket.block_bytes, dtype=torch.uint8)
        sender = UcxKVSender()
        try:
            async with worker.engine._lock:  # an engine step that has not ended yet
                joining = asyncio.ensure_future(anext(worker.decode("r-admit", 7, SamplingParams(max_tokens=4))))
                await sender.send(r.ticket, 0, list(blocks))
                while not worker.engine._lock._waiters:  # decode() now waits to join the batch
                    await asyncio.sleep(0.01)
                joining.cancel()
            with pytest.raises(asyncio.CancelledError):
                await joining
        finally:
            await sender.close()
        await settles(lambda: engine.stats().reserved == 0)
        stats = engine.stats()
        assert stats.reserved == 0 and stats.free_blocks == stats.total_blocks, stats
        assert worker.active_reservations == 0
