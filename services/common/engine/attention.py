"""Paged attention, plugged into transformers through its attention interface.

`attend` reads each sequence's KV from the pool: decodes through pdserve's paged kernel where built, prefill
chunks through its own kernel where the CPU has AMX or AVX512_BF16 and the model runs in bf16, else by SDPA.
`paged_attention` is its transformers face: it writes the layer's new keys and values first.
How and why: docs/engine.md ("Paged attention through transformers").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

ATTN_IMPLEMENTATION = "pdserve_paged"


@dataclass
class PrefillSlice:
    """One sequence's prefill chunk: query rows [start, end) of the packed batch."""

    start: int
    end: int
    context_len: int  # tokens of KV after this chunk (cached + earlier chunks + chunk)
    block_ids: torch.Tensor  # [ceil(context_len / block_size)]


@dataclass
class DecodeGroup:
    """Decode rows [start, end) of the packed batch, attended in one padded call.

    Its contexts are within 2x of each other, or all short (model_runner's
    grouping): one padded call for a whole batch would make every stream pay
    for the longest context's attention.
    """

    start: int
    end: int
    context_len: int  # the longest context in the group; keys past it are not read
    block_tables: torch.Tensor  # [n, ceil(context_len / block_size)], padded with block 0
    context_lens: torch.Tensor  # [n] int64, each sequence's own context
    mask: torch.Tensor | None  # [n, 1, 1, context_len] additive; None when every context is context_len


@dataclass
class AttentionMetadata:
    kv_cache: torch.Tensor  # the pool, [num_blocks, layers, 2, block_size, kv_heads, head_dim]
    slot_blocks: torch.Tensor  # [T] pool block of each new token
    slot_offsets: torch.Tensor  # [T] offset inside that block
    prefills: list[PrefillSlice]
    decode_groups: list[DecodeGroup]  # decode rows come first in the packed batch
    paged_kernel: bool = False  # decodes by torch.ops.pdserve.paged_decode (kernels/), in place
    prefill_kernel: bool = False  # prefills by torch.ops.pdserve.prefill_attention (AMX or AVX512_BF16), in place

    @property
    def decode_only(self) -> bool:
        """Whether one paged_decode call attends every row: a decode step through the kernel."""
        return self.paged_kernel and not self.prefills and len(self.decode_groups) == 1


def _gather(kv_cache: torch.Tensor, layer: int, kv: int, block_ids: torch.Tensor) -> torch.Tensor:
    """[..., n_blocks] block ids -> [..., kv_heads, n_blocks * block_size, head_dim].

    index_select copies whole blocks (contiguous rows of this layer's view);
    it measured faster than advanced indexing on the block-major pool.
    """
    x = kv_cache[:, layer, kv].index_select(0, block_ids.reshape(-1))
    x = x.view(*block_ids.shape[:-1], -1, *x.shape[-2:])  # [..., tokens, kv_heads, head_dim]
    return x.transpose(-3, -2)


def _decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """One query token per sequence: q [heads, n, d], k/v [n, kv_heads, ctx, d] -> [n, heads, d].

    Two batched matmuls with the query heads grouped by their KV head, in float32:
    SDPA's CPU kernel measured 3-4x slower for one query row, and oneDNN's bf16
    matmul builds a new kernel for every new context length (docs/engine.md)."""
    heads, n, d = q.shape
    kv_heads = k.shape[1]
    qg = q.transpose(0, 1).reshape(n, kv_heads, heads // kv_heads, d).float()  # head h reads KV head h // group
    scale = d**-0.5 if scale is None else scale
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [n, kv_heads, group, ctx]
    if mask is not None:
        scores = scores + mask  # [n, 1, 1, ctx]
    return torch.matmul(scores.softmax(-1), v.float()).reshape(n, heads, d).to(q.dtype)


def attend(q: torch.Tensor, meta: AttentionMetadata, layer: int, scale: float | None) -> torch.Tensor:
    """q [T, heads, d] of the packed batch -> [T, heads, d], each row over its sequence's KV in the pool
    (this step's keys and values already written there)."""
    cache = meta.kv_cache
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if meta.decode_only:
        g = meta.decode_groups[0]
        return torch.ops.pdserve.paged_decode(q, cache, layer, g.block_tables, g.context_lens, scale)
    if meta.prefill_kernel and not meta.decode_groups and len(meta.prefills) == 1:
        p = meta.prefills[0]  # a step that is one prompt's chunk: the op's output is the step's, no copy
        return torch.ops.pdserve.prefill_attention(q[p.start : p.end], cache, layer, p.block_ids, p.context_len, scale)
    out = torch.empty_like(q)
    for g in meta.decode_groups:
        if meta.paged_kernel:
            out[g.start : g.end] = torch.ops.pdserve.paged_decode(
                q[g.start : g.end], cache, layer, g.block_tables, g.context_lens, scale
            )
            continue
        k = _gather(cache, layer, 0, g.block_tables)[:, :, : g.context_len]  # [n, kv_heads, ctx, d]
        v = _gather(cache, layer, 1, g.block_tables)[:, :, : g.context_len]
        out[g.start : g.end] = _decode_attention(q[g.start : g.end].transpose(0, 1), k, v, g.mask, scale)
    for p in meta.prefills:
        if meta.prefill_kernel:
            out[p.start : p.end] = torch.ops.pdserve.prefill_attention(
                q[p.start : p.end], cache, layer, p.block_ids, p.context_len, scale
            )
            continue
        k = _gather(cache, layer, 0, p.block_ids)[:, : p.context_len]  # [kv_heads, ctx, d]
        v = _gather(cache, layer, 1, p.block_ids)[:, : p.context_len]
        q_len = p.end - p.start
        if q_len == p.context_len:
            mask, causal = None, True
        else:  # a later chunk: query i sees keys up to its own position
            first = p.context_len - q_len
            rows = torch.arange(first, p.context_len, device=q.device).unsqueeze(1)
            mask, causal = torch.arange(p.context_len, device=q.device).unsqueeze(0) <= rows, False
        o = F.scaled_dot_product_attention(
            q[p.start : p.end].transpose(0, 1).unsqueeze(0),
            k.unsqueeze(0),
            v.unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )[0]
        out[p.start : p.end] = o.transpose(0, 1)
    return out


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, heads, T, d]; key/value [1, kv_heads, T, d], new tokens only."""
    meta: AttentionMetadata = kwargs["pdserve_attn"]
    cache = meta.kv_cache
    cache[meta.slot_blocks, module.layer_idx, 0, meta.slot_offsets] = key[0].transpose(0, 1)
    cache[meta.slot_blocks, module.layer_idx, 1, meta.slot_offsets] = value[0].transpose(0, 1)
    # transformers expects [batch, T, heads, d].
    return attend(query[0].transpose(0, 1), meta, module.layer_idx, scaling).unsqueeze(0), None


def _no_mask(*args, **kwargs):
    """Masks are built per sequence inside paged_attention; skip transformers' mask."""
    return None


def register() -> str:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _no_mask)
    return ATTN_IMPLEMENTATION
