"""The KV store in a running suite: multi-turn reuse, eviction pressure, store down; and alone,
a write lease that expires."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pdserve.kvstore import serve as kvstore_serve
from pdserve.kvstore.config import KVStoreConfig
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import kvstore_pb2 as kpb
from pdserve.v1 import kvstore_pb2_grpc
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import text_of_tokens
from tests.polling import settles
from tests.reference import transformers_greedy
from tests.service.suite import inprocess_suite, pools_full

NO_LOCAL_CACHE = {"enable_prefix_caching": False}  # so any reuse must come from the store


def _request(ids, rid, max_tokens=10):
    return rpb.GenerateRequest(
        request_id=rid,
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


async def _collect(stub, req):
    tokens, last = [], None
    async for r in stub.Generate(req):
        tokens += r.token_ids
        last = r
    return tokens, last


async def test_second_turn_loads_the_history_from_the_store(smollm2):
    _, model, tokenizer = smollm2
    turn1 = text_of_tokens(tokenizer, 600)
    async with inprocess_suite(smollm2, store_blocks=256, prefill_kw=NO_LOCAL_CACHE) as suite:
        answer, first = await _collect(suite.stub, _request(turn1, "t1"))
        assert first.usage.cached_tokens == 0
        await _settled(suite, 600 // 16)  # write-back happens after the first token
        turn2 = turn1 + answer + text_of_tokens(tokenizer, 40, offset=3)
        tokens, last = await _collect(suite.stub, _request(turn2, "t2"))
        assert last.usage.cached_tokens >= 600 // 16 * 16
        assert tokens == transformers_greedy(model, turn2, 10)
        stats = await suite.store_stats()
        assert stats.blocks_written >= 600 // 16 and stats.blocks_read >= 600 // 16
        assert stats.active_leases == 0


async def test_decode_worker_loads_the_history_from_the_store_and_receives_only_the_rest(smollm2):
    _, model, tokenizer = smollm2
    turn1 = text_of_tokens(tokenizer, 600)
    async with inprocess_suite(
        smollm2, store_blocks=256, prefill_kw=NO_LOCAL_CACHE, decode_kw={"use_store": True, **NO_LOCAL_CACHE}
    ) as suite:
        answer, _ = await _collect(suite.stub, _request(turn1, "t1"))
        await _settled(suite, 600 // 16)  # write-back happens after the first token
        decode = suite.worker_stubs()[0]
        before = (await decode.GetStats(dpb.GetDecodeStatsRequest())).kv_bytes_received
        turn2 = turn1 + answer + text_of_tokens(tokenizer, 40, offset=3)
        tokens, last = await _collect(suite.stub, _request(turn2, "t2"))
        received = (await decode.GetStats(dpb.GetDecodeStatsRequest())).kv_bytes_received - before
        assert tokens == transformers_greedy(model, turn2, 10)
        block_bytes = (await suite.store_stats()).block_bytes
        # Only the blocks past the stored prefix came from the prefill worker.
        assert received <= (len(turn2) - 600 // 16 * 16 + 16) // 16 * block_bytes
        assert last.usage.cached_tokens >= 600 // 16 * 16


async def test_a_store_push_that_cannot_be_fenced_quarantines_the_reservation_and_the_worker_serves_on(
    smollm2, monkeypatch
):
    # The store died mid-message while pushing a prefix: its bytes may still land, so those blocks
    # are not reused while it may (freed, the next request's KV could be overwritten); the request fails over.
    _, model, tokenizer = smollm2
    turn1 = text_of_tokens(tokenizer, 300)
    async with inprocess_suite(
        smollm2, store_blocks=256, prefill_kw=NO_LOCAL_CACHE, decode_kw={"use_store": True, **NO_LOCAL_CACHE}
    ) as suite:
        answer, _ = await _collect(suite.stub, _request(turn1, "t1"))
        await _settled(suite, 300 // 16)
        worker = suite.decode_workers[0]
        receiver, real = worker.store.receiver, worker.store.receiver.cancel
        unfenced = []

        async def cancel_once_unfenced(transfer_id: str) -> bool:
            if transfer_id.startswith("r-") and not unfenced:  # the store client's read
                unfenced.append(transfer_id)
                await real(transfer_id)
                return False
            return await real(transfer_id)

        monkeypatch.setattr(receiver, "cancel", cancel_once_unfenced)
        never = asyncio.get_running_loop().create_future()  # the store's push never completes
        monkeypatch.setattr(receiver, "when_fenced", lambda transfer_id: never)
        turn2 = turn1 + answer + text_of_tokens(tokenizer, 40, offset=3)
        with pytest.raises(grpc.aio.AioRpcError) as failed:  # one decode worker: no other to retry on
            await _collect(suite.stub, _request(turn2, "t2"))
        assert failed.value.code() is grpc.StatusCode.ABORTED and "could not be fenced" in failed.value.details()
        stats = worker.engine.stats()
        assert unfenced and stats.quarantined_blocks >= 300 // 16 and stats.reserved == 0
        tokens, _ = await _collect(suite.stub, _request(turn2, "t2-again"))  # the worker serves on
        assert tokens == transformers_greedy(model, turn2, 10)


async def test_a_decode_worker_prefilling_locally_reads_the_store_and_writes_the_conversation_back(smollm2):
    # The router's cost model sends short prompts to the decode worker to prefill there
    # ("always" here): turn 2 starts from turn 1's prompt and reply, which the decode
    # worker itself wrote to the store (its own prefix cache is off: reuse is the store's).
    _, model, tokenizer = smollm2
    turn1 = text_of_tokens(tokenizer, 300)
    async with inprocess_suite(
        smollm2,
        store_blocks=256,
        decode_kw={"use_store": True, **NO_LOCAL_CACHE},
        router_kw={"local_prefill": "always"},
    ) as suite:
        answer, first = await _collect(suite.stub, _request(turn1, "t1", max_tokens=40))
        assert first.usage.cached_tokens == 0 and not first.route.disaggregated
        context_blocks = (len(turn1) + len(answer) - 1) // 16  # the last token's KV is never computed
        assert (await _settled(suite, context_blocks)).blocks_written == context_blocks
        turn2 = turn1 + answer + text_of_tokens(tokenizer, 40, offset=3)
        tokens, last = await _collect(suite.stub, _request(turn2, "t2"))
        assert tokens == transformers_greedy(model, turn2, 10) and not last.route.disaggregated
        assert last.usage.cached_tokens == context_blocks * 16  # the prompt and the reply, from the store
        written = (len(turn2) + len(tokens) - 1) // 16  # and turn 2's new blocks after them
        stats = await _settled(suite, written)
        assert stats.blocks_read == context_blocks and stats.blocks_written == written
        await pools_full(suite)


async def test_a_local_request_cancelled_mid_stream_offers_what_it_computed_and_frees_every_block(smollm2):
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 200)
    async with inprocess_suite(
        smollm2, store_blocks=256, decode_kw={"use_store": True}, router_kw={"local_prefill": "always"}
    ) as suite:
        for attempt in range(3):  # cancelled at different points of the stream
            call = suite.stub.Generate(_request(prompt, f"c{attempt}", max_tokens=500))
            got = 0
            async for r in call:
                got += len(r.token_ids)
                if got > 2 * attempt:
                    break
            call.cancel()
        await pools_full(suite)  # nothing held: not by the engine, not for the store
        stats = await _settled(suite, 200 // 16)
        assert stats.active_leases == 0


async def _settled(suite, written: int, evictions: int = 0):
    """The store's stats once `written` blocks are in (and `evictions` made) and nothing is
    in flight (a request's blocks are offered after its stream is answered)."""

    async def check():
        stats = await suite.store_stats()
        done = stats.active_leases == 0 and stats.blocks_written >= written and stats.evictions >= evictions
        return stats if done else None

    if (stats := await settles(check)) is None:
        raise AssertionError(f"the store never settled: {await suite.store_stats()}")
    return stats


async def test_eviction_pressure_keeps_output_correct(smollm2):
    _, model, tokenizer = smollm2
    prompts = [text_of_tokens(tokenizer, 200, offset=i) for i in range(4)]
    expected = [transformers_greedy(model, p, 10) for p in prompts]
    async with inprocess_suite(smollm2, store_blocks=8, prefill_kw=NO_LOCAL_CACHE) as suite:
        for round_ in range(2):
            results = await asyncio.gather(
                *(_collect(suite.stub, _request(p, f"{round_}-{i}")) for i, p in enumerate(prompts))
            )
            assert [t for t, _ in results] == expected
            await _settled(suite, 0)  # this round's write-backs are in before the next
        stats = await _settled(suite, 0, evictions=1)
        assert stats.used_blocks <= 8
        await pools_full(suite)


async def test_serving_continues_when_the_store_is_down(smollm2):
    _, model, tokenizer = smollm2
    ids = text_of_tokens(tokenizer, 100)
    async with inprocess_suite(smollm2, prefill_kw={"kvstore": "127.0.0.1:1"}) as suite:
        tokens, last = await _collect(suite.stub, _request(ids, "x"))
        assert tokens == transformers_greedy(model, ids, 10) and last.finish_reason == pb.FINISH_REASON_LENGTH


def _offer(*first_bytes: int) -> kpb.ReserveWriteRequest:
    """A write offer of one block per value, under a made-up fingerprint."""
    hashes = [bytes([b]) * 16 for b in first_bytes]
    return kpb.ReserveWriteRequest(kv_fingerprint=bytes(16), block_hashes=hashes)


async def test_a_write_lease_never_committed_expires_and_frees_its_slots():
    # A writer that reserves, then vanishes (no push, no commit, no release): the lease's sweeper
    # ends it after lease_ms, fences its UCX receives and gives the slots back.
    config = KVStoreConfig(port=0, capacity_blocks=4, lease_ms=300)
    server, port, service = kvstore_serve.build(config, block_bytes=64)
    await service.start()
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            store = kvstore_pb2_grpc.KVStoreStub(channel)

            async def freed():
                stats = await store.GetStats(kpb.GetStoreStatsRequest())
                return stats.active_leases == 0 and stats.used_blocks == 0

            reserved_at = time.monotonic()
            lost = await store.ReserveWrite(_offer(0, 1, 2, 3))
            assert list(lost.accepted_indices) == [0, 1, 2, 3] and not await freed()
            crowded = await store.ReserveWrite(_offer(4, 5, 6, 7))
            assert list(crowded.accepted_indices) == []  # every slot is leased: none can be evicted
            assert await settles(freed), await store.GetStats(kpb.GetStoreStatsRequest())
            assert time.monotonic() - reserved_at >= 0.3  # not before its time
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await store.CommitWrite(kpb.CommitWriteRequest(transfer_id=lost.ticket.transfer_id))
            assert late.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in late.value.details()
            again = await store.ReserveWrite(_offer(4, 5, 6, 7))
            assert list(again.accepted_indices) == [0, 1, 2, 3]  # the slots serve the next writer
            await store.Release(kpb.ReleaseLeaseRequest(lease_id=again.ticket.transfer_id))
    finally:
        await server.stop(grace=0)
        await service.aclose()
