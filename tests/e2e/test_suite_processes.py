"""Router, prefill and decode as separate OS processes, through the client SDK."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

from pdserve.client import AsyncClient, InvalidArgument
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import decode_pb2_grpc, prefill_pb2_grpc
from tests.engine.prompts import prompts_by_length
from tests.polling import settles
from tests.reference import transformers_greedy

NEW = 16


@pytest.fixture(scope="module")
def references(smollm2):
    """Four prompts (7 to 250 tokens) and transformers' greedy continuations."""
    _, model, tokenizer = smollm2
    return [(ids, transformers_greedy(model, ids, NEW)) for ids in prompts_by_length(tokenizer)[1:5]]


async def loads(suite) -> list[pb.WorkerLoad]:
    out = []
    for s in suite.services:
        if s.address and s.name.startswith(("prefill", "decode")):
            stub = prefill_pb2_grpc.PrefillStub if s.name.startswith("prefill") else decode_pb2_grpc.DecodeStub
            async with grpc.aio.insecure_channel(s.address) as ch:
                out.append((await stub(ch).GetLoad(pb.GetLoadRequest(), timeout=5)).load)
    return out


async def decode_stats(suite) -> dpb.GetDecodeStatsResponse:
    (decode,) = [s for s in suite.services if s.name.startswith("decode")]
    async with grpc.aio.insecure_channel(decode.address) as ch:
        return await decode_pb2_grpc.DecodeStub(ch).GetStats(dpb.GetDecodeStatsRequest(), timeout=5)


async def free_pools(suite) -> list[pb.WorkerLoad]:
    """The workers' loads once every pool is all free and nothing runs; frees are
    asynchronous (a cancel reaches the workers after the client has moved on)."""
    seen: list[pb.WorkerLoad] = []

    async def free() -> bool:
        seen[:] = await loads(suite)
        return all(w.free_blocks == w.total_blocks and w.running_seqs == 0 for w in seen)

    assert await settles(free, timeout=30), seen
    return seen


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
async def test_concurrent_prompts_match_transformers(start_suite, references, mode):
    suite = start_suite(mode)
    async with AsyncClient(suite.router_target, timeout=120) as client:
        results = await asyncio.gather(
            *(client.complete(ids, max_tokens=NEW, temperature=0.0) for ids, _ in references)
        )
        for (ids, expected), c in zip(references, results):
            assert c.token_ids == expected
            assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == len(expected)
            assert c.route["disaggregated"] == (mode == "disaggregated")
        with pytest.raises(InvalidArgument) as err:
            await client.complete("hello", top_p=1.5)
        assert err.value.field == "top_p"
    workers = await free_pools(suite)
    assert len(workers) == (2 if mode == "disaggregated" else 1)
    assert ("kvstore" in [s.name for s in suite.services]) == (mode == "disaggregated")


async def test_cancelling_a_stream_frees_blocks_on_both_workers(start_suite, smollm2):
    _, _, tokenizer = smollm2
    suite = start_suite("disaggregated")
    ids = prompts_by_length(tokenizer)[5]  # 600 tokens
    before = await decode_stats(suite)
    async with AsyncClient(suite.router_target, timeout=120) as client:
        got = 0
        async with client.generate(ids, max_tokens=400, ignore_eos=True, temperature=0.0) as stream:
            async for chunk in stream:
                got += len(chunk.token_ids)
                if got >= 4:
                    break
        await free_pools(suite)
        stats = await decode_stats(suite)
        assert stats.requests_aborted == before.requests_aborted + 1
        assert stats.tokens_generated - before.tokens_generated < 400  # stopped, not run to its end
        after = await client.complete(ids[:50], max_tokens=8, temperature=0.0)
        assert len(after.token_ids) == 8


async def test_pdserve_generate_streams_what_the_sdk_gets_and_names_a_bad_field(start_suite):
    suite = start_suite("colocated")  # the suite the tests above started
    question = "What is the capital of France?"
    async with AsyncClient(suite.router_target, timeout=120) as client:
        expected = await client.complete(
            messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0.0
        )
    cli = [sys.executable, "-m", "pdserve", "generate", "--target", suite.router_target, "--max-tokens", "12"]
    done = await asyncio.to_thread(subprocess.run, [*cli, question], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n" and expected.text.strip()
    # The router's refusal (a prompt past the context window), as its status and field: no traceback.
    refused = await asyncio.to_thread(
        subprocess.run, [*cli, "--raw", "hello " * 10_000], capture_output=True, text=True, timeout=120
    )
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr.startswith("pdserve: INVALID_ARGUMENT: prompt") and "Traceback" not in refused.stderr
