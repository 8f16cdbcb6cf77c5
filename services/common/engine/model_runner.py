"""Run one scheduled batch through the model; read-only over sequences.

Tokens of all scheduled sequences are packed into one row (decodes first),
with their own positions; the paged attention function finds each
sequence's KV through the block tables built here. Only the rows that will
be sampled are projected to logits.
"""
from __future__ import annotations

import torch

from pdserve.common.engine.attention import AttentionMetadata, PrefillSlice
from pdserve.common.engine.scheduler import ScheduledBatch
from pdserve.common.engine.sequence import Sequence
from pdserve.common.kv.pool import KVPool


class ModelRunner:
    def __init__(self, model, pool: KVPool):
        self.model = model
        self.pool = pool
        self.block_size = pool.spec.block_size
        self.device = pool.tensor.device

    def _metadata(self, batch: ScheduledBatch) -> tuple[list[int], list[int], AttentionMetadata, list[Sequence], list[int]]:
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

        for seq in batch.decodes:
            add(seq, 1)
        prefills: list[PrefillSlice] = []
        for seq, n in batch.prefills:
            start = len(ids)
            add(seq, n)
            ctx = seq.num_computed_tokens + n
            blocks = torch.tensor(seq.block_table[: (ctx + bs - 1) // bs], dtype=torch.long, device=self.device)
            prefills.append(PrefillSlice(start, start + n, ctx, blocks))

        decode_tables = decode_mask = None
        if batch.decodes:
            ctx_lens = torch.tensor([s.num_computed_tokens + 1 for s in batch.decodes])
            max_blocks = (int(ctx_lens.max()) + bs - 1) // bs
            decode_tables = torch.zeros((len(batch.decodes), max_blocks), dtype=torch.long)
            for i, seq in enumerate(batch.decodes):
                table = seq.block_table[:max_blocks]
                decode_tables[i, : len(table)] = torch.tensor(table)
            valid = torch.arange(max_blocks * bs).unsqueeze(0) < ctx_lens.unsqueeze(1)
            decode_mask = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))[:, None, None, :]
            decode_tables, decode_mask = decode_tables.to(self.device), decode_mask.to(self.device)

        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            kv_cache=self.pool.tensor,
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=self.device),
            slot_offsets=pos_t % bs,
            prefills=prefills,
            num_decode=len(batch.decodes),
            decode_block_tables=decode_tables,
            decode_mask=decode_mask,
        )
        return ids, positions, meta, sample_seqs, sample_rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None]:
        """Returns the sequences to sample and their logits [n, vocab]."""
        ids, positions, meta, sample_seqs, sample_rows = self._metadata(batch)
        if not sample_rows:
            # Every chunk is mid-prompt: still run (KV is written), keep one row.
            sample_rows = [len(ids) - 1]
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            logits_to_keep=torch.tensor(sample_rows, device=self.device),
            use_cache=False,
            pdserve_attn=meta,
        )
        if not sample_seqs:
            return [], None
        return sample_seqs, out.logits[0].float()
