"""The router, prefill and decode services over real gRPC and UCX, in one process."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.router.prompt import GenerateInput
from pdserve.router.request_metrics import RequestMetrics
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import prompts_by_length
from tests.polling import settles
from tests.reference import transformers_greedy
from tests.service.suite import inprocess_suite, pools_full

NEW = 12


def _request(ids, rid, max_tokens=NEW, **sampling):
    return rpb.GenerateRequest(
        request_id=rid,
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
    )


async def _collect(stub, req):
    tokens, text, last = [], "", None
    async for r in stub.Generate(req):
        tokens += r.token_ids
        text += r.text
        last = r
    return tokens, text, last


@pytest.fixture(scope="module")
def references(smollm2):
    _, model, tokenizer = smollm2
    return [(ids, transformers_greedy(model, ids, NEW)) for ids in prompts_by_length(tokenizer)[1:6]]


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
async def test_concurrent_greedy_requests_match_transformers(smollm2, references, mode):
    _, _, tokenizer = smollm2
    async with inprocess_suite(smollm2, mode) as suite:
        results = await asyncio.gather(
            *(_collect(suite.stub, _request(ids, f"r{i}")) for i, (ids, _) in enumerate(references))
        )
        for (ids, expected), (tokens, text, last) in zip(references, results):
            assert tokens == expected
            assert text == tokenizer.decode(expected, skip_special_tokens=True)
            assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == len(expected)
            assert last.route.disaggregated == (mode == "disaggregated")
            assert last.timing.ttft_ms > 0 and last.timing.total_ms >= last.timing.ttft_ms
        await pools_full(suite)


async def test_cancelled_stream_frees_blocks_on_both_workers(smollm2):
    _, _, tokenizer = smollm2
    ids = prompts_by_length(tokenizer)[4]
    async with inprocess_suite(smollm2) as suite:
        call = suite.stub.Generate(_request(ids, "long", max_tokens=500, ignore_eos=True))
        got = 0
        async for r in call:
            got += len(r.token_ids)
            if got >= 3:
                break
        call.cancel()
        await pools_full(suite)
        tokens, _, last = await _collect(suite.stub, _request(ids, "after"))
        assert len(tokens) == NEW and last.finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize("tokens_before", [1, 4], ids=["reserved", "decoding"])
async def test_a_client_gone_while_the_router_is_at_a_yield_is_cleaned_up_before_the_close_returns(
    smollm2, tokens_before
):
    # A front end whose client goes while it sends an event closes the router's stream, which is
    # then at a yield: GeneratorExit there, not CancelledError. Cleanup runs on both, before the close
    # returns. After the first token (prefill's) the router holds the decode reservation; later,
    # the Decode stream does.
    _, _, tokenizer = smollm2
    ids = prompts_by_length(tokenizer)[4]
    async with inprocess_suite(smollm2) as suite:
        router = suite.router.router
        inp = GenerateInput(SamplingParams(max_tokens=500, ignore_eos=True), token_ids=ids, request_id="gone")
        events = RequestMetrics().observe(router.generate(inp))  # as both front ends call it
        got = 0
        async for ev in events:
            got += len(ev.token_ids)
            if got >= tokens_before:
                break
        await events.aclose()
        workers = router.pool.decode + router.pool.prefill
        assert router.inflight == 0
        assert [(w.inflight, w.inflight_tokens, w.own_prompt_tokens) for w in workers] == [(0, 0, 0)] * len(workers)
        await pools_full(suite)  # the downstream cancel and the Release reached the workers


async def test_stop_string_is_matched_by_the_router(smollm2):
    _, _, tokenizer = smollm2
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    async with inprocess_suite(smollm2) as suite:
        _, full, _ = await _collect(suite.stub, _request(ids, "full", max_tokens=20))
        assert "Paris" in full
        _, text, last = await _collect(suite.stub, _request(ids, "stop", max_tokens=20, stop=["Paris"]))
        assert text == full[: full.index("Paris")] and last.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
async def test_a_prompt_one_token_short_of_the_workers_context_gets_exactly_one_token(smollm2, mode):
    # The workers' pools hold 128 tokens: their context window, tighter than the router's.
    async with inprocess_suite(smollm2, mode, num_kv_blocks=8) as suite:
        ids = list(range(1000, 1127))  # 127 tokens
        tokens, _, last = await _collect(suite.stub, _request(ids, "edge", max_tokens=5, ignore_eos=True))
        assert len(tokens) == 1 and last.finish_reason == pb.FINISH_REASON_LENGTH
        await pools_full(suite)


async def test_an_unclaimed_reservation_expires_and_frees_its_blocks(smollm2):
    from pdserve.v1 import decode_pb2 as dpb

    async with inprocess_suite(smollm2) as suite:
        decode = suite.worker_stubs()[0]
        r = await decode.Reserve(
            dpb.ReserveRequest(
                request_id="orphan",
                prompt_token_ids=list(range(100, 200)),
                kv_fingerprint=suite.decode[0].engine.spec.fingerprint,
                lease_ms=300,
            )
        )
        assert r.ticket.num_blocks > 0 and r.ticket.expires_at_unix_ms > 0
        assert (await suite.loads())[0].free_blocks < (await suite.loads())[0].total_blocks

        async def freed() -> bool:  # the prefill worker never calls: the lease runs out
            load = (await suite.loads())[0]
            return load.free_blocks == load.total_blocks

        assert await settles(freed)
        stats = await decode.GetStats(dpb.GetDecodeStatsRequest())
        assert stats.reservations_expired == 1 and stats.reservations_active == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a late Decode finds nothing to decode
            async for _ in decode.Decode(dpb.DecodeRequest(request_id="orphan", first_token_id=5)):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_seeded_requests_in_bfloat16_draw_what_one_bfloat16_engine_draws(smollm2, make_engine):
    """The prefill worker draws the first token, the decode worker the rest, over real UCX with
    bfloat16 KV; the tokens are those of one engine that does both. One request at a time on both
    sides: in bfloat16 a batch of another size may round differently (docs/engine.md, Precision)."""
    _, _, tokenizer = smollm2
    prompts = prompts_by_length(tokenizer)[1:4]  # 7 to 100 tokens: one prefill chunk on both sides
    seeded = {"max_tokens": NEW, "temperature": 0.9, "top_p": 0.95, "seed": 4242, "ignore_eos": True}
    engine = make_engine("bfloat16")
    alone = [engine.generate([ids], SamplingParams(**seeded))[0] for ids in prompts]
    async with inprocess_suite(smollm2, dtype="bfloat16") as suite:
        assert {rt.engine.spec.dtype for rt in suite.decode + suite.prefill} == {"bfloat16"}
        for i, (ids, want) in enumerate(zip(prompts, alone)):
            tokens, _, last = await _collect(
                suite.stub,
                rpb.GenerateRequest(
                    request_id=f"s{i}", token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(**seeded)
                ),
            )
            assert last.route.disaggregated
            assert tokens == want, f"prompt of {len(ids)} tokens"
