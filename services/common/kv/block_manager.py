"""Block accounting: which pool block belongs to whom, and prefix reuse.

A block is free or ref-counted by its sequences; the free list doubles as the prefix cache's LRU, and a
block's hash is registered only once its KV is fully computed.
Why: docs/engine.md ("Scheduling and the prefix cache").
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.common.engine.sequence import Sequence
from pdserve.common.errors import CapacityExhaustedError
from pdserve.common.kv.hashing import ROOT, block_hash


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, fingerprint: bytes, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.fingerprint = fingerprint
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion order = LRU order
        self._hash_to_block: dict[bytes, int] = {}
        self.quarantined: dict[str, list[int]] = {}  # by request: blocks a transfer may still write
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, served from cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def _take_free(self) -> Block:
        block_id = next(iter(self._free))
        del self._free[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self._hash_to_block.get(block.hash) == block_id:
            del self._hash_to_block[block.hash]  # evicted from the prefix cache
        block.hash = None
        block.ref_count = 1
        return block

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Pool blocks holding the longest cached prefix of the prompt.

        The last prompt token is always recomputed (its logits are needed),
        so only blocks ending before it may hit.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = ROOT
        for i in range((seq.num_prompt_tokens - 1) // self.block_size):
            parent = block_hash(self.fingerprint, parent, seq.block_tokens(i))
            block_id = self._hash_to_block.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _blocks_taken(self, seq: Sequence, hits: list[int]) -> int:
        """Free blocks allocating `seq` over its cached prefix `hits` takes: a hit another sequence holds
        is shared, not taken; one in the free list (the cache's LRU) is."""
        return seq.num_blocks - sum(1 for b in hits if self.blocks[b].ref_count > 0)

    def can_allocate(self, seq: Sequence, hits: list[int] | None = None) -> bool:
        hits = self.cached_prefix(seq) if hits is None else hits
        return self.num_free_blocks >= self._blocks_taken(seq, hits)

    def allocate(self, seq: Sequence, hits: list[int] | None = None) -> None:
        """Give `seq` blocks for its whole prompt, reusing cached prefix blocks (`hits`, its cached_prefix()
        if the caller has it, with no allocation since)."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self.cached_prefix(seq) if hits is None else hits
        needed = self._blocks_taken(seq, hits)
        if self.num_free_blocks < needed:
            raise CapacityExhaustedError(f"{needed} KV blocks needed, {self.num_free_blocks} free")
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.block_hashes = [self.blocks[b].hash for b in hits]
        while len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free().block_id)
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        self.prefix_queries += seq.num_prompt_tokens
        self.prefix_hits += seq.num_cached_tokens

    def slots_needed(self, seq: Sequence) -> int:
        """New blocks `seq` needs so that every one of its tokens has a slot."""
        return max(0, seq.num_blocks - len(seq.block_table))

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= self.slots_needed(seq)

    def append_slots(self, seq: Sequence) -> None:
        for _ in range(self.slots_needed(seq)):
            seq.block_table.append(self._take_free().block_id)

    def commit_computed(self, seq: Sequence) -> None:
        """Register hashes of blocks whose KV is now complete."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT
            h = block_hash(self.fingerprint, parent, seq.block_tokens(i))
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            block.hash = h
            self._hash_to_block.setdefault(h, block.block_id)

    def free(self, seq: Sequence) -> None:
        self._release(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []

    def quarantine(self, seq: Sequence) -> None:
        """Keep `seq`'s blocks out of use (a transfer into them could not be fenced) until reclaim(), less
        its prefix-cache hits: shared, and never a transfer's target, they are released as free() would.
        The others were never a prefix (a reservation's blocks are registered once its KV is in)."""
        shared = seq.num_cached_tokens // self.block_size
        self._release(seq.block_table[:shared])
        self.quarantined[seq.request_id] = seq.block_table[shared:]
        seq.block_table = []
        seq.block_hashes = []

    def reclaim(self, request_id: str) -> int:
        """A quarantine's blocks back in use (the transfer into them is fenced after all); how many."""
        kept = self.quarantined.pop(request_id, [])
        self._release(kept)
        return len(kept)

    @property
    def num_quarantined(self) -> int:
        return sum(map(len, self.quarantined.values()))

    @property
    def usable_tokens(self) -> int:
        """What the blocks out of quarantine hold."""
        return (self.num_blocks - self.num_quarantined) * self.block_size

    def _release(self, block_ids: list[int]) -> None:
        # Tail blocks first, so the deepest (least shareable) blocks are evicted first.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
