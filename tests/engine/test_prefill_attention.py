"""Prefill attention through AMX tiles, or AVX512_BF16 vectors (kernels/prefill_attention.cpp).

It computes causal attention over a sequence's blocks in the pool, for a whole prompt
or a later chunk of one, as SDPA computes it over the gathered blocks: the tiles within
bf16's rounding of the softmax weights, which torch's own CPU flash attention also makes;
the vectors, whose weights stay float32, as close as that bf16 SDPA.
"""

import pytest
import torch
import torch.nn.functional as F

from pdserve.common.engine import kernels

BLOCK = 16


@pytest.fixture(scope="module")
def prefill_attention():
    if not kernels.prefill_kernel(torch.bfloat16, 64):
        pytest.skip("needs AMX or AVX512_BF16 (and the kernels built); elsewhere prefills run by SDPA")
    return torch.ops.pdserve.prefill_attention


def _reference(q, cache, layer, block_ids, ctx, scale):
    """float32 SDPA over the gathered blocks; query i sits at position ctx - len(q) + i."""
    k, v = (cache[block_ids, layer, j].reshape(-1, *cache.shape[-2:])[:ctx].transpose(0, 1).float() for j in (0, 1))
    first = ctx - q.shape[0]
    mask = torch.arange(ctx)[None, :] <= torch.arange(first, ctx)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "q_len,ctx",
    [(1024, 1024), (17, 17), (1, 33), (300, 700), (64, 130), (5, 1000)],  # whole prompts, later chunks, off the edges
)
def test_prefill_attention_matches_sdpa_over_the_gathered_blocks(prefill_attention, head_dim, q_len, ctx):
    torch.manual_seed(q_len * 7 + ctx)
    layers, kv_heads, heads = 2, 3, 9
    cache = torch.randn(80, layers, 2, BLOCK, kv_heads, head_dim, dtype=torch.bfloat16)
    block_ids = torch.randperm(80)[: (ctx + BLOCK - 1) // BLOCK]  # scattered, unordered blocks
    q = torch.randn(q_len, heads, head_dim, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    got = prefill_attention(q, cache, 1, block_ids, ctx, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    torch.testing.assert_close(got.float(), _reference(q, cache, 1, block_ids, ctx, scale), atol=2e-2, rtol=2e-2)


def test_on_vectors_it_is_as_close_to_float32_as_torch_s_bf16_sdpa(prefill_attention):
    """Without AMX the softmax weights are not rounded to bf16: rounded, bf16 fell under its 98% gate
    of fp32's tokens (test_precision_gates.py), at 1.45x SDPA's mean error."""
    if kernels.amx():
        pytest.skip("through AMX tiles the weights are rounded to bf16, as SDPA's are")
    torch.manual_seed(5)
    ctx, layer = 1000, 1
    cache = torch.randn(64, 2, 2, BLOCK, 3, 64, dtype=torch.bfloat16)
    block_ids = torch.randperm(64)[: ctx // BLOCK + 1]
    q = torch.randn(ctx, 9, 64, dtype=torch.bfloat16)
    want = _reference(q, cache, layer, block_ids, ctx, 0.125)
    k, v = (cache[block_ids, layer, j].reshape(-1, 3, 64)[:ctx].transpose(0, 1) for j in (0, 1))
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True, scale=0.125, enable_gqa=True)
    got_err = (prefill_attention(q, cache, layer, block_ids, ctx, 0.125).float() - want).abs().mean()
    sdpa_err = (sdpa.transpose(0, 1).float() - want).abs().mean()
    assert got_err <= 1.1 * sdpa_err


def test_prefill_attention_reads_only_its_blocks_and_keys(prefill_attention):
    """Blocks outside the list, keys past ctx and other layers are never read: NaN there changes nothing."""
    torch.manual_seed(2)
    cache = torch.full((12, 2, 2, BLOCK, 3, 64), float("nan"), dtype=torch.bfloat16)
    block_ids, ctx = torch.tensor([7, 3, 10]), 40
    for b in block_ids.tolist():
        cache[b, 0] = torch.randn(2, BLOCK, 3, 64, dtype=torch.bfloat16)
    cache[10, 0, :, ctx - 2 * BLOCK :] = float("nan")  # past the context, inside its last block
    q = torch.randn(25, 9, 64, dtype=torch.bfloat16)
    got = prefill_attention(q, cache, 0, block_ids, ctx, 0.125)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), _reference(q, cache, 0, block_ids, ctx, 0.125), atol=2e-2, rtol=2e-2)


def test_a_later_chunk_attends_as_the_same_rows_of_the_whole_prompt(prefill_attention):
    """Chunked prefill: rows 600-1023 computed as their own chunk equal those rows of one 1,024-row call."""
    torch.manual_seed(3)
    cache = torch.randn(64, 1, 2, BLOCK, 3, 64, dtype=torch.bfloat16)
    block_ids = torch.randperm(64)
    q = torch.randn(1024, 9, 64, dtype=torch.bfloat16)
    whole = prefill_attention(q, cache, 0, block_ids, 1024, 0.125)
    chunk = prefill_attention(q[600:], cache, 0, block_ids, 1024, 0.125)
    torch.testing.assert_close(chunk, whole[600:], atol=0, rtol=0)


def test_scores_that_keep_rising_along_the_keys_are_rescaled_exactly(prefill_attention):
    """The running max moves only past a slack, so a max that climbs block after block (keys that grow
    with their position, scores up to ~60) must still rescale every earlier sum: SDPA's result."""
    torch.manual_seed(4)
    ctx = 700
    cache = torch.randn(48, 1, 2, BLOCK, 3, 64, dtype=torch.bfloat16)
    block_ids = torch.randperm(48)[: (ctx + BLOCK - 1) // BLOCK]
    growth = torch.linspace(0.2, 4.0, ctx)
    keys = cache[block_ids, 0, 0].reshape(-1, 3, 64)[:ctx].float() * growth[:, None, None]
    cache[block_ids, 0, 0] = (
        torch.cat([keys, torch.zeros(len(block_ids) * BLOCK - ctx, 3, 64)])
        .reshape(len(block_ids), BLOCK, 3, 64)
        .to(torch.bfloat16)
    )
    q = torch.randn(ctx, 9, 64, dtype=torch.bfloat16) * 2
    got = prefill_attention(q, cache, 0, block_ids, ctx, 0.125)
    torch.testing.assert_close(got.float(), _reference(q, cache, 0, block_ids, ctx, 0.125), atol=2e-2, rtol=2e-2)
