"""The engine, the KV transfer and the disaggregated suite on a CUDA device.

Skipped where there is none (CI has no GPU). Run on a lent GPU machine with
`pytest tests/gpu`; docs/transfer.md records the last run. The model is a
tiny random Llama with SmolLM2's tokenizer (the real weights cannot travel
there), built from a fixed seed.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from pdserve.common import model_loader
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.kv.hashing import block_hashes
from pdserve.common.kv.pool import KVPool
from pdserve.common.kv.spec import KVSpec
from pdserve.common.kv.store_client import StoreClient
from pdserve.common.transfer import TransferStatus, ucx
from pdserve.common.transfer.staging import StagedBlock
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import prompts_by_length
from tests.reference import transformers_greedy
from tests.service.suite import inprocess_suite, pools_full

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NEW_TOKENS = 24
SPEC = KVSpec("SmolLM2-135M-Instruct", "test", num_layers=30, num_kv_heads=3, head_dim=64)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(ref, model on cuda, tokenizer): the triple the in-process suite takes."""
    ref = model_loader.resolve(str(tiny_model_dir))
    model, tokenizer = model_loader.load(ref, device="cuda")
    return ref, model, tokenizer


@pytest.fixture(scope="module")
def cases(tiny):
    """(prompt ids, transformers' greedy continuation on cuda) for prompts of 1 to 1,500 tokens."""
    _, model, tokenizer = tiny
    return [(ids, transformers_greedy(model, ids, NEW_TOKENS)) for ids in prompts_by_length(tokenizer)]


def _engine(tiny, **kw) -> LLMEngine:
    ref, _, tokenizer = tiny
    model, _ = model_loader.load(ref, device="cuda")
    config = EngineConfig(device="cuda", dtype="float32", num_kv_blocks=512, **kw)  # as the reference
    return LLMEngine(config, model, tokenizer, ref)


def test_the_engine_on_cuda_is_token_identical_to_transformers(tiny, cases):
    engine = _engine(tiny, max_num_batched_tokens=64)  # chunked, all prompts in one batch
    assert engine.pool.tensor.is_cuda
    got = engine.generate([ids for ids, _ in cases], SamplingParams(max_tokens=NEW_TOKENS))
    for (ids, expected), tokens in zip(cases, got):
        assert tokens == expected, f"prompt of {len(ids)} tokens"
    assert engine.stats().free_blocks == engine.stats().total_blocks


def test_seeded_sampling_on_cuda_repeats_whatever_shares_the_batch(tiny, cases):
    engine = _engine(tiny)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    alone = engine.generate([cases[3][0]], params)[0]
    batched = engine.generate([cases[3][0], cases[4][0], cases[5][0]], params)[0]
    assert alone == batched


def test_a_cuda_pool_stages_through_a_pinned_host_mirror():
    pool = KVPool(SPEC, 4, "cuda")
    block = pool.block(2)
    assert isinstance(block, StagedBlock)
    assert block.device.is_cuda and block.device.data_ptr() == pool.tensor[2].data_ptr()
    assert not block.host.is_cuda and block.host.data_ptr() == pool.host[2].data_ptr()
    assert pool.pinned and pool.host.is_pinned()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_cuda_blocks_cross_real_ucx_and_land_only_once_verified(dtype):
    spec = dataclasses.replace(SPEC, dtype=dtype)
    src, dst = KVPool(spec, 8, "cuda"), KVPool(spec, 8, "cuda")
    src.tensor.copy_(torch.randn(src.tensor.shape, device="cuda"))
    rx, tx = ucx.UcxKVReceiver(), ucx.UcxKVSender()
    try:
        # Blocks 0-4 of src into dst's 7, 1, 5, 2, 6, in two sends as prefill chunks go.
        dest = [7, 1, 5, 2, 6]
        ticket = rx.expect("t1", [dst.block(b) for b in dest])
        await tx.send(ticket, 0, [src.block(b) for b in range(3)])
        await tx.send(ticket, 3, [src.block(b) for b in range(3, 5)])
        await rx.wait("t1", 30)
        assert rx.status("t1") is TransferStatus.DONE
        for i, b in enumerate(dest):
            assert torch.equal(dst.tensor[b], src.tensor[i]), f"block {i} -> {b}"
        assert not dst.tensor[0].any() and not dst.tensor[3].any()  # untouched
        await rx.cancel("t1")

        # A checksum that does not match: FAILED, and not a byte reaches the device block.
        real = ucx.block_checksum
        ticket = rx.expect("t2", [dst.block(0)])
        ucx.block_checksum = lambda buf: bytes(16)
        try:
            await tx.send(ticket, 0, [src.block(6)])
        finally:
            ucx.block_checksum = real
        with pytest.raises(Exception, match="checksum"):
            await rx.wait("t2", 30)
        assert not dst.tensor[0].any()
        await rx.cancel("t2")
    finally:
        await tx.close()
        await rx.close()


def _request(ids, rid):
    return rpb.GenerateRequest(
        request_id=rid,
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0),
    )


async def _tokens(suite, request) -> list[int]:
    out = []
    async for msg in suite.stub.Generate(request):
        out.extend(msg.token_ids)
    return out


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
async def test_the_suite_on_cuda_streams_transformers_tokens(tiny, cases, mode):
    """Four prompts at once through router, prefill and decode on cuda pools, with a
    KV store (the second round's prefixes load from it into the cuda pools)."""
    picked = [cases[i] for i in (2, 4, 5, 6)]  # 30 to 1,000 tokens
    async with inprocess_suite(tiny, mode, device="cuda", store_blocks=256, decode_kw={"use_store": True}) as suite:
        for turn in range(2):
            got = await asyncio.gather(
                *(_tokens(suite, _request(ids, f"{mode}-{turn}-{i}")) for i, (ids, _) in enumerate(picked))
            )
            assert got == [expected for _, expected in picked], f"round {turn}"
        await pools_full(suite)
        if mode == "disaggregated":
            assert (await suite.store_stats()).used_blocks > 0  # written back from a cuda pool
            await _a_stored_prefix_loads_into_a_cuda_pool_as_into_a_cpu_one(suite, picked[-1][0])


async def _a_stored_prefix_loads_into_a_cuda_pool_as_into_a_cpu_one(suite, prompt: list[int]) -> None:
    spec = suite.prefill[0].engine.spec
    hashes = block_hashes(spec.fingerprint, prompt, spec.block_size)
    pools = {device: KVPool(spec, len(hashes), device) for device in ("cuda", "cpu")}
    rx, tx = ucx.UcxKVReceiver(), ucx.UcxKVSender()
    try:
        for pool in pools.values():
            client = StoreClient(f"127.0.0.1:{suite.store_port}", rx, tx, spec.fingerprint)
            try:
                blocks = [pool.block(b) for b in range(len(hashes))]
                assert await client.load_prefix(hashes, blocks, 0) == len(hashes) > 10
            finally:
                await client.close()
    finally:
        await tx.close()
        await rx.close()
    assert pools["cpu"].tensor.any()
    assert torch.equal(pools["cuda"].tensor.cpu(), pools["cpu"].tensor)
