"""Admission control and deadlines: the suite bounds the work it takes on and
the time it spends on a request.

Overload is answered at once with RESOURCE_EXHAUSTED (HTTP 429) from a bounded
queue (the router's max_inflight, a worker's max_queue) instead of with
unbounded latency, and the requests that were accepted complete. A client's
gRPC deadline travels downstream: when it passes, the client gets
DEADLINE_EXCEEDED and no worker keeps computing for it.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
import pytest

from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import text_of_tokens
from tests.service.suite import inprocess_suite, pools_full


def _request(prompt: str | list[int], rid: str, max_tokens: int) -> rpb.GenerateRequest:
    which = {"text": prompt} if isinstance(prompt, str) else {"token_ids": pb.TokenIds(ids=prompt)}
    return rpb.GenerateRequest(
        request_id=rid, **which, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )


async def _outcome(stub, req: rpb.GenerateRequest, timeout: float | None = None):
    """(status code, tokens, seconds until the call ended)."""
    t0, tokens, last = time.perf_counter(), 0, None
    try:
        async for r in stub.Generate(req, timeout=timeout):
            tokens += len(r.token_ids)
            last = r
    except grpc.aio.AioRpcError as e:
        return e.code(), tokens, time.perf_counter() - t0
    assert last is not None and last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == tokens
    return grpc.StatusCode.OK, tokens, time.perf_counter() - t0


def _computed(suite) -> list[int]:
    """Tokens each worker has run through its model so far."""
    return [rt.engine.computed_tokens for rt in suite.decode + suite.prefill]


async def test_the_router_refuses_past_max_inflight_at_once_and_finishes_what_it_took(smollm2):
    async with inprocess_suite(smollm2, router_kw={"max_inflight": 2}) as suite:
        flood = [_request("Count: 1, 2, 3,", f"r{i}", max_tokens=16) for i in range(8)]
        calls = [asyncio.create_task(_outcome(suite.stub, req)) for req in flood]
        while suite.router.router.inflight < 2:  # both slots taken
            await asyncio.sleep(0.005)
        async with aiohttp.ClientSession() as http:  # the HTTP API answers 429 meanwhile
            async with http.post(suite.router.http.url + "/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
                status, error = r.status, (await r.json())["error"]
        outcomes = await asyncio.gather(*calls)
        done = [o for o in outcomes if o[0] is grpc.StatusCode.OK]
        refused = [o for o in outcomes if o[0] is grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(done) == 2 and len(refused) == 6, outcomes
        assert all(tokens == 16 for _, tokens, _ in done)
        # Refused at admission, not after waiting behind the others.
        assert max(s for _, _, s in refused) < min(s for _, _, s in done)
        assert (status, error["code"]) == (429, "rate_limit_exceeded")
        await pools_full(suite)


@pytest.mark.parametrize(
    "mode, max_retries",
    [
        ("colocated", 0),
        ("disaggregated", 0),
        ("disaggregated", 2),  # the retry finds every worker excluded: still the queue's RESOURCE_EXHAUSTED
    ],
)
async def test_a_full_worker_queue_is_resource_exhausted_and_accepted_requests_complete(smollm2, mode, max_retries):
    # The router would take 16; the one decode worker queues 1 beyond the 1 it runs.
    async with inprocess_suite(
        smollm2,
        mode,
        decode_kw={"max_queue": 1, "max_num_seqs": 1},
        router_kw={"max_inflight": 16, "max_retries": max_retries},
    ) as suite:
        outcomes = await asyncio.gather(
            *(_outcome(suite.stub, _request("Count: 1, 2, 3,", f"r{i}", 12)) for i in range(6))
        )
        codes = [code for code, _, _ in outcomes]
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        done = [s for code, _, s in outcomes if code is grpc.StatusCode.OK]
        refused = [s for code, _, s in outcomes if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert max(refused) < max(done)  # nobody waited behind the queue to be refused
        await pools_full(suite)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
async def test_a_passed_client_deadline_stops_every_worker_at_once(smollm2, phase):
    _, _, tokenizer = smollm2
    prompt_tokens = 1500 if phase == "prefill" else 40
    async with inprocess_suite(smollm2) as suite:
        # The deadline is set from this machine's speed, measured here (after a first request
        # has warmed the workers): the time to a first token for a prompt of this length.
        await _outcome(suite.stub, _request(text_of_tokens(tokenizer, 40, offset=60), "warm", max_tokens=2))
        timed = _request(text_of_tokens(tokenizer, prompt_tokens, offset=50), "timed", max_tokens=1)
        t0 = time.perf_counter()
        await _outcome(suite.stub, timed)
        first_token_s = time.perf_counter() - t0
        # Passed early in the prefill, or a few tokens into the decode.
        deadline_s = first_token_s / 10 if phase == "prefill" else 4 * first_token_s
        before = _computed(suite)
        prompt = text_of_tokens(tokenizer, prompt_tokens, offset=5)
        hurried = _request(prompt, "hurried", max_tokens=1000)
        code, tokens, _ = await _outcome(suite.stub, hurried, timeout=deadline_s)
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert (tokens == 0) if phase == "prefill" else (tokens > 0)
        await pools_full(suite)
        # Nothing kept computing for the client who left: neither the whole prompt nor the 1000 tokens.
        spent = sum(after - b for after, b in zip(_computed(suite), before))
        assert spent < (prompt_tokens if phase == "prefill" else 1000), (spent, deadline_s)
