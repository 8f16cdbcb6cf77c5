"""Run one scheduled batch through the model; read-only over sequences.

Tokens of all scheduled sequences are packed into one row (decodes first,
shortest context first), with their own positions; the paged attention
function finds each sequence's KV through the block tables built here. Only
the rows that will be sampled are projected to logits.
"""

from __future__ import annotations

import threading

import torch

from pdserve.common.engine import kernels, llama, packed_linear, quantize, weight_arena
from pdserve.common.engine.attention import AttentionMetadata, DecodeGroup, PrefillSlice
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.scheduler import ScheduledBatch
from pdserve.common.engine.sequence import Sequence
from pdserve.common.kv.pool import KVPool

# Decodes whose contexts are within GROUP_SPAN x of the group's shortest (or
# all under GROUP_MIN_TOKENS) share one padded attention call. One call for
# the whole batch made every stream pay for the longest context: 8 streams at
# 128 tokens beside one at 2,048 took 559 ms a step against 86 ms alone.
GROUP_SPAN = 2
GROUP_MIN_TOKENS = 256


def group_by_context(context_lens: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of an ascending list whose padded attention stays within GROUP_SPAN x."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(context_lens) + 1):
        if i == len(context_lens) or context_lens[i] > max(GROUP_SPAN * context_lens[start], GROUP_MIN_TOKENS):
            groups.append((start, i))
            start = i
    return groups


def _why_unfused(config: EngineConfig, cpu: bool, model) -> str:
    """Why the model runs transformers' layers, not llama.FusedLlama ("": it runs fused)."""
    if not config.fused_layers:
        return "turned off"
    if not cpu:
        return "not on CPU"
    if not kernels.load():
        return "no pdserve kernels"
    if not kernels.vectorized():
        return "no AVX-512 for the fused kernels"
    return llama.unsupported(model)


class ModelRunner:
    def __init__(self, model, pool: KVPool, config: EngineConfig | None = None):
        """Packs the model's linear layers and loads the paged kernel where the config asks and the CPU can."""
        config = config or EngineConfig()
        self.model = model
        self.pool = pool
        self.block_size = pool.spec.block_size
        self.device = pool.tensor.device
        cpu = self.device.type == "cpu"
        self.packed_linears = 0
        pack = config.pack_weights and cpu and packed_linear.can_pack(str(self.device), model.dtype)
        # With the kernel each sequence reads its own context: no grouping, no masks.
        self.paged_kernel = config.paged_kernel and cpu and kernels.load()
        self.prefill_kernel = self.paged_kernel and kernels.prefill_kernel(pool.tensor.dtype, pool.tensor.shape[-1])
        heads = model.config.num_attention_heads
        self.decode_tiles = self.paged_kernel and kernels.decode_tiles(
            pool.tensor.dtype, heads, pool.tensor.shape[-1], self.block_size
        )
        self.fused: llama.FusedLlama | None = None
        self.unfused_why = _why_unfused(config, cpu, model)
        self.int8 = config.quantization == "int8"
        if self.int8:
            quantize.check_usable(model.dtype)
        if not self.unfused_why:
            self.fused = llama.FusedLlama(model, pack, self.int8)
            self.packed_linears = self.fused.linears
        else:
            if self.int8:
                quantize.quantize_linears(model)
            if pack:  # what int8 left: the LM head
                self.packed_linears = packed_linear.pack_linears(model)

    def weights_to_huge_pages(self) -> threading.Thread | None:
        """Once warm: the row kernel's weights (or float32 panels) into huge pages, on a thread (weight_arena)."""
        arena = self.fused.arena if self.fused else None
        return weight_arena.collapse_in_background(arena) if arena is not None else None

    def describe(self) -> str:
        packed = "int8 weights (weight-only, a scale per channel; the LM head kept), " if self.int8 else ""
        packed += f"{self.packed_linears} linear layers packed for oneDNN, " if self.packed_linears else ""
        tiled = ""
        if self.fused and self.fused.tiled:
            how = "AMX tiles" if kernels.amx() else "AVX512_BF16 vectors"
            tiled = f" ({self.fused.tiled} matmuls over packed panels: {how})"
        elif self.fused and self.fused.float_panels:
            tiled = f" ({self.fused.float_panels} matmuls over float32 panels, at every row count)"
        elif self.fused and self.fused.rows:
            how = " (bf16 weights, float32 sums)" if self.model.dtype == torch.bfloat16 else ""
            reach = f"up to {self.fused.rows_reach} rows, timed here"
            tiled = f" ({self.fused.rows} matmuls through the row kernel{how} {reach})"
        layers = f"fused layers{tiled}, " if self.fused else f"transformers layers ({self.unfused_why}), "
        attention = "decode attention: " + ("pdserve paged kernel" if self.paged_kernel else "torch ops")
        attention += " (k . q^T through AMX tiles)" if self.decode_tiles else ""
        prefill = ", prefill attention: pdserve kernel " + ("(AMX tiles)" if kernels.amx() else "(AVX512_BF16 vectors)")
        return packed + layers + attention + (prefill if self.prefill_kernel else "")

    def _metadata(
        self, batch: ScheduledBatch
    ) -> tuple[list[int], list[int], AttentionMetadata, list[Sequence], list[int]]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        sample_seqs: list[Sequence] = []
        sample_rows: list[int] = []

        def add(seq: Sequence, n: int) -> None:
            start = seq.num_computed_tokens
            toks = seq.token_ids[start : start + n]
            ids.extend(toks)
            pos = range(start, start + n)
            positions.extend(pos)
            slot_blocks.extend(seq.block_table[p // bs] for p in pos)
            if start + n == seq.num_tokens:  # caught up: the last row is sampled
                sample_seqs.append(seq)
                sample_rows.append(len(ids) - 1)

        # A one-token chunk that catches up (a decode worker's first step after the KV import)
        # is attended as a decode, so it rounds as a colocated engine's decode does.
        caught_up = [s for s, n in batch.prefills if n == 1 and s.num_computed_tokens + 1 == s.num_tokens]
        decodes = sorted(batch.decodes + caught_up, key=lambda s: s.num_computed_tokens)
        for seq in decodes:
            add(seq, 1)
        prefills: list[PrefillSlice] = []
        for seq, n in batch.prefills:
            if seq in caught_up:
                continue
            start = len(ids)
            add(seq, n)
            ctx = seq.num_computed_tokens + n
            blocks = torch.tensor(seq.block_table[: (ctx + bs - 1) // bs], dtype=torch.long, device=self.device)
            prefills.append(PrefillSlice(start, start + n, ctx, blocks))

        ctx_lens = [s.num_computed_tokens + 1 for s in decodes]
        runs = [(0, len(decodes))] if self.paged_kernel and decodes else group_by_context(ctx_lens)
        decode_groups = [self._decode_group(decodes[a:b], ctx_lens[a:b], a) for a, b in runs]
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            kv_cache=self.pool.tensor,
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=self.device),
            slot_offsets=pos_t % bs,
            prefills=prefills,
            decode_groups=decode_groups,
            paged_kernel=self.paged_kernel,
            prefill_kernel=self.prefill_kernel,
        )
        return ids, positions, meta, sample_seqs, sample_rows

    def _decode_group(self, seqs: list[Sequence], ctx_lens: list[int], start: int) -> DecodeGroup:
        bs = self.block_size
        ctx = max(ctx_lens)
        tables = torch.zeros((len(seqs), (ctx + bs - 1) // bs), dtype=torch.long)
        for i, seq in enumerate(seqs):
            table = seq.block_table[: (ctx_lens[i] + bs - 1) // bs]
            tables[i, : len(table)] = torch.tensor(table)
        lens = torch.tensor(ctx_lens, dtype=torch.long)
        mask = None
        if min(ctx_lens) < ctx and not self.paged_kernel:
            valid = torch.arange(ctx).unsqueeze(0) < lens.unsqueeze(1)
            mask = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))[:, None, None, :].to(self.device)
        return DecodeGroup(start, start + len(seqs), ctx, tables.to(self.device), lens.to(self.device), mask)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None]:
        """Returns the sequences to sample and their logits [n, vocab]."""
        ids, positions, meta, sample_seqs, sample_rows = self._metadata(batch)
        if not sample_rows:
            # Every chunk is mid-prompt: still run (KV is written), keep one row.
            sample_rows = [len(ids) - 1]
        if self.fused is not None:
            logits = self.fused(
                torch.tensor(ids, device=self.device),
                torch.tensor(positions, device=self.device),
                meta,
                torch.tensor(sample_rows, device=self.device),
            )
        else:
            logits = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                position_ids=torch.tensor([positions], device=self.device),
                logits_to_keep=torch.tensor(sample_rows, device=self.device),
                use_cache=False,
                pdserve_attn=meta,
            ).logits[0]
        if not sample_seqs:
            return [], None
        return sample_seqs, logits.float()
