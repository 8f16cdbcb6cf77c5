"""Continuous batching with chunked prefill under a per-step token budget.

Each step: decodes first, then the next chunk of each part-prefilled prompt, then new sequences while the
budget, the sequence limit and free KV blocks allow; the newest is preempted when decode runs out of blocks.
Why this order: docs/engine.md ("Scheduling and the prefix cache").
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.common.engine.sequence import FinishReason, Sequence, SequenceStatus
from pdserve.common.kv.block_manager import BlockManager


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # also the prefill chunk size
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)  # one new token each
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = self.num_preemptions
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining == 1:
                while not self.blocks.can_append(seq):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING or budget < 1:
                    continue
                self.blocks.append_slots(seq)
                batch.decodes.append(seq)
                budget -= 1
            elif budget > 0:
                n = self._prefill_tokens(remaining, budget, batch)
                if n is None:
                    continue
                batch.prefills.append((seq, n))
                budget -= n
        if self.num_preemptions == preempted:  # admit nothing in a step that had to preempt: memory is short
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        """Waiting sequences into the batch, first come first served, while the budget, the sequence limit
        and free blocks allow. A sequence that already holds its blocks (KV imported from a prefill worker)
        passes a prompt waiting for blocks: it needs none, and only once it runs do its blocks come back
        (behind such a prompt, with nothing running, they never would)."""
        fresh_waits = False
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            fresh = not seq.block_table
            if fresh and fresh_waits:
                continue
            hits = self.blocks.cached_prefix(seq) if fresh else []
            if not (self.blocks.can_allocate(seq, hits) if fresh else self.blocks.can_append(seq)):
                fresh_waits = fresh_waits or fresh
                continue
            computed = len(hits) * self.blocks.block_size if fresh else seq.num_computed_tokens
            # Decided before allocating: blocks taken and given back would evict cached prefixes.
            n = self._prefill_tokens(seq.num_tokens - computed, budget, batch)
            if n is None:
                return  # wait for a step with no other prompt in it
            if fresh:
                self.blocks.allocate(seq, hits)
            else:
                self.blocks.append_slots(seq)
            self.waiting.remove(seq)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.prefills.append((seq, n))
            budget -= n

    def _prefill_tokens(self, remaining: int, budget: int, batch: ScheduledBatch) -> int | None:
        """How much of a prompt this step computes; None: none of it, this step.
        Chunked: what the budget has left. Unchunked: the whole prompt, beside the decodes
        but alone among prompts when it does not fit the budget (so one long prompt never
        waits forever behind running streams, and the budget still caps many short ones)."""
        if self.config.enable_chunked_prefill or remaining <= budget:
            return min(remaining, budget)
        return None if batch.prefills else remaining

    def postprocess(self, batch: ScheduledBatch, sampled: dict[Sequence, int]) -> None:
        """Advance progress; append each sampled token to its sequence."""
        for seq in batch.decodes:
            seq.num_computed_tokens += 1
        for seq, n in batch.prefills:
            seq.num_computed_tokens += n
        for seq in [*batch.decodes, *(s for s, _ in batch.prefills)]:
            self.blocks.commit_computed(seq)
        for seq, token in sampled.items():
            seq.output_token_ids.append(token)

    def finish(self, seq: Sequence, reason: FinishReason, free_blocks: bool = True) -> None:
        """Take `seq` out of the batch; `free_blocks=False` leaves its blocks
        owned (a prefill worker still sending them), to be freed by the owner."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if free_blocks:
            self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
