"""Failure recovery: a worker that dies, stalls or sends bad KV costs the client nothing
but time. Faults are real: gRPC servers stopped mid-call (to the router, a crash; the
process lives on: tests/e2e/test_faults_processes.py SIGKILLs real worker processes),
KV bytes whose checksum is wrong crossing real UCX. Every pool is back to full afterwards."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.common.transfer import base, ucx
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import text_of_tokens
from tests.polling import settles
from tests.service.suite import inprocess_suite, pools_full


def _request(ids, rid, max_tokens=24, **kw):
    return rpb.GenerateRequest(
        request_id=rid,
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0, **kw}),
    )


async def _collect(stream):
    tokens, last = [], None
    async for r in stream:
        tokens += r.token_ids
        last = r
    return tokens, last


def _busy(runtime) -> bool:
    stats = runtime.engine.stats()
    return stats.running + stats.waiting > 0


async def _stop_when_busy(runtimes, dead: set[str], tokens_seen: list | None = None) -> str:
    """Stop the gRPC server of whichever worker is working on the request (a crash, as
    its peers see it: in-flight calls end, new connections are refused)."""

    def busy():
        working = [rt for rt in runtimes if _busy(rt)]
        return working[0] if working and (tokens_seen is None or len(tokens_seen) >= 6) else None

    victim = await settles(busy, timeout=60, interval=0.002)
    assert victim is not None, "no worker ever got the request"
    await victim.server.stop(grace=0)
    dead.add(victim.worker_id)
    return victim.worker_id


async def test_a_prefill_worker_stopped_mid_prefill_is_retried_on_another_with_the_same_tokens(smollm2):
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 900, offset=3)  # eight engine steps of 128 tokens: seen busy
    dead: set[str] = set()
    async with inprocess_suite(smollm2, prefill_workers=2) as suite:
        call = asyncio.create_task(_collect(suite.stub.Generate(_request(prompt, "faulted"))))
        killed = await _stop_when_busy(suite.prefill, dead)
        tokens, last = await call
        assert last.route.prefill_worker_id not in ("", killed)
        assert suite.router.router.recoveries["prefill"] == 1
        expected, _ = await _collect(suite.stub.Generate(_request(prompt, "unfaulted")))
        assert tokens == expected and len(tokens) == 24
        await pools_full(suite, dead)


async def test_with_every_prefill_worker_gone_the_decode_worker_prefills_and_the_router_stays_serving(smollm2):
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 200, offset=4)
    async with inprocess_suite(smollm2) as suite:
        expected, first = await _collect(suite.stub.Generate(_request(prompt, "before")))
        assert first.route.disaggregated
        (prefill,) = suite.prefill
        await prefill.server.stop(grace=0)
        pool = suite.router.router.pool
        assert await settles(lambda: not pool.prefill[0].healthy, timeout=30)
        tokens, last = await _collect(suite.stub.Generate(_request(prompt, "after")))
        assert tokens == expected and not last.route.disaggregated
        assert pool.ready()  # health stays SERVING: the suite still serves
        await pools_full(suite, {prefill.worker_id})


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.95, "seed": 7}], ids=["greedy", "seeded"])
async def test_a_decode_worker_stopped_mid_stream_migrates_with_no_token_lost_or_repeated(smollm2, sampling):
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 40, offset=7)
    dead: set[str] = set()
    async with inprocess_suite(smollm2, decode_workers=2) as suite:
        expected, _ = await _collect(
            suite.stub.Generate(_request(prompt, "baseline", max_tokens=48, ignore_eos=True, **sampling))
        )
        got: list[int] = []

        async def stream():
            last = None
            async for r in suite.stub.Generate(_request(prompt, "faulted", max_tokens=48, ignore_eos=True, **sampling)):
                got.extend(r.token_ids)
                last = r
            return last

        call = asyncio.create_task(stream())
        killed = await _stop_when_busy(suite.decode, dead, tokens_seen=got)
        last = await call
        # Greedy: the re-prefilled context decodes the same tokens; seeded: the
        # draws go on from the position reached (seed_offset), not from the start.
        assert got == expected
        assert last.usage.completion_tokens == 48 and last.route.decode_worker_id != killed
        assert suite.router.router.recoveries["decode"] == 1
        await pools_full(suite, dead)


def _payload_flip(flipped: list):
    """A block_checksum for the prefill side that hashes its first block truly, then flips one of its
    bytes. In one process the receiver's UCX worker moves only once the send is posted and the event
    loop runs, so the flip is what lands. `flipped` gets (bytes, offset) to undo it."""

    def checksum(buf):
        digest = base.block_checksum(buf)
        if not flipped:
            flipped.append((buf, buf.size // 2))
            buf[buf.size // 2] ^= 0x10
        return digest

    return checksum


@pytest.mark.parametrize("corrupted", ["header", "payload"])
async def test_kv_that_fails_its_checksum_is_recomputed_never_decoded(smollm2, monkeypatch, corrupted):
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 100, offset=11)  # one prefill chunk: its KV leaves in one send
    async with inprocess_suite(smollm2) as suite:
        flipped = []
        with monkeypatch.context() as m:  # the headers claim checksums that the bytes that land lack
            lying = _payload_flip(flipped) if corrupted == "payload" else lambda buf: bytes(16)
            m.setattr(ucx, "block_checksum", lying)
            tokens, last = await _collect(suite.stub.Generate(_request(prompt, "corrupted")))
        for buf, offset in flipped:  # the prefill worker's cached block as it computed it
            buf[offset] ^= 0x10
        assert not last.route.disaggregated  # the only prefill worker sent bad KV: decode recomputed
        assert suite.router.router.recoveries["decode"] == 1
        decode_stats = await suite.worker_stubs()[0].GetStats(dpb.GetDecodeStatsRequest())
        assert decode_stats.transfers_failed == 1
        expected, _ = await _collect(suite.stub.Generate(_request(prompt, "clean")))
        assert tokens == expected
        await pools_full(suite)


async def test_when_the_retry_budget_is_spent_the_client_gets_the_error_not_a_hang(smollm2, monkeypatch):
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 64, offset=13)
    async with inprocess_suite(smollm2, router_kw={"max_retries": 0}) as suite:
        with monkeypatch.context() as m:
            m.setattr(ucx, "block_checksum", lambda buf: bytes(16))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(_collect(suite.stub.Generate(_request(prompt, "doomed"))), 60)
        assert err.value.code() is grpc.StatusCode.ABORTED
        assert "after 1 attempts" in err.value.details() and "checksum mismatch" in err.value.details()
        recoveries = suite.router.router.recoveries  # not retried: counted as given up, and only so
        assert recoveries["gave_up"] == 1 and sum(n for phase, n in recoveries.items() if phase != "gave_up") == 0
        await pools_full(suite)


async def test_a_failure_with_no_other_worker_left_counts_as_given_up_alone(smollm2):
    """Its recovery was counted before the router knew there was nowhere to go: both counters rose."""
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 40, offset=17)
    async with inprocess_suite(smollm2, "colocated") as suite:
        tokens = 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for r in suite.stub.Generate(_request(prompt, "alone", max_tokens=200, ignore_eos=True)):
                tokens += len(r.token_ids)
                if tokens >= 4:
                    await suite.decode[0].server.stop(grace=0)  # the only worker
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE and "after 1 attempts" in err.value.details()
        recoveries = suite.router.router.recoveries
        assert recoveries["gave_up"] == 1 and sum(n for phase, n in recoveries.items() if phase != "gave_up") == 0


async def test_clients_reusing_a_request_id_never_reach_each_others_work_on_the_workers(smollm2, monkeypatch):
    # One client's id "foo", another's "foo.retry1" (what a retry of foo was once called), and "foo"
    # again once the first ends (the SDK resends the id it was given): each request's work on the
    # workers is its own, so a release for one never frees another's reservation.
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 40, offset=3)
    async with inprocess_suite(smollm2) as suite:
        seen: list[str] = []
        (decode,) = suite.decode_workers
        real = decode.reserve

        async def recorded(request_id, *args):
            seen.append(request_id)
            return await real(request_id, *args)

        monkeypatch.setattr(decode, "reserve", recorded)
        for rid in ("foo", "foo.retry1", "foo"):
            await _collect(suite.stub.Generate(_request(prompt, rid, max_tokens=2)))
        assert len(set(seen)) == 3 and all(s.startswith(("foo.", "foo.retry1.")) for s in seen)
        await pools_full(suite)


async def test_a_retry_never_collides_with_what_the_failed_attempt_left_behind(smollm2, monkeypatch):
    """The first decode worker loses its reservation (as a lease that ran out would) right
    after issuing the ticket. The only prefill worker is still on that attempt's KV push
    when the router retries there: the retry goes under its own id and succeeds."""
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 200, offset=17)
    async with inprocess_suite(smollm2, decode_workers=2, prefill_kw={"transfer_timeout_s": 5.0}) as suite:
        lost: list[str] = []
        for w in suite.decode_workers:

            async def reserve_then_lose(request_id, *args, _w=w, _reserve=w.reserve):
                r = await _reserve(request_id, *args)
                if not lost:
                    lost.append(request_id)
                    await _w.release(request_id)
                return r

            monkeypatch.setattr(w, "reserve", reserve_then_lose)
        tokens, last = await _collect(suite.stub.Generate(_request(prompt, "lost")))
        # Workers see the client's id made this request's own; the retry's is another.
        assert len(lost) == 1 and lost[0].startswith("lost.") and suite.router.router.recoveries["decode"] == 1
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        expected, _ = await _collect(suite.stub.Generate(_request(prompt, "clean")))
        assert tokens == expected
        await pools_full(suite)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
async def test_a_stream_that_outlasts_the_router_rpc_timeout_is_not_cut(smollm2, mode):
    """rpc_timeout_s bounds the router's unary calls; a token stream lasts as long as the client's own
    deadline (none here): cut, a long answer failed as DEADLINE_EXCEEDED and was retried from scratch."""
    ids = text_of_tokens(smollm2[2], 24)
    async with inprocess_suite(smollm2, mode, router_kw={"rpc_timeout_s": 0.5}) as suite:
        loop = asyncio.get_running_loop()
        started = loop.time()
        tokens, last = await _collect(suite.stub.Generate(_request(ids, "long", max_tokens=128, ignore_eos=True)))
        assert loop.time() - started > 0.5  # the stream did outlast the timeout
        assert len(tokens) == 128 and last.finish_reason == pb.FINISH_REASON_LENGTH
        assert suite.router.router.recoveries["gave_up"] == 0
        await pools_full(suite)
