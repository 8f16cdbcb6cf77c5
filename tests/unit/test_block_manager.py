"""Block accounting and prefix caching, without a model."""

import pytest

from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.sequence import Sequence
from pdserve.common.errors import CapacityExhaustedError
from pdserve.common.kv.block_manager import BlockManager
from pdserve.common.kv.hashing import block_hashes

BS = 4
FP = b"model-a" * 2


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(), BS)


def computed(bm, s):
    """Pretend the model computed the whole sequence."""
    bm.allocate(s)
    s.num_computed_tokens = s.num_tokens
    bm.commit_computed(s)
    return s


def test_allocate_takes_blocks_for_the_prompt_and_free_returns_them():
    bm = BlockManager(8, BS, FP)
    s = seq(range(10))
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_shared_prefix_is_reused_and_counted():
    bm = BlockManager(16, BS, FP)
    a = computed(bm, seq(range(13), "a"))
    b = seq(list(range(12)) + [99, 98], "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 12 and b.num_computed_tokens == 12
    assert b.block_table[:3] == a.block_table[:3]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.prefix_hits == 12


def test_last_prompt_token_is_always_recomputed():
    bm = BlockManager(16, BS, FP)
    computed(bm, seq(range(8), "a"))
    b = seq(range(8), "b")  # identical, block aligned
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # the second block holds the last token: not reused


def test_freed_blocks_stay_cached_until_reused_lru():
    bm = BlockManager(4, BS, FP)
    a = computed(bm, seq(range(8), "a"))
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq(list(range(8)) + [1], "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 8  # still there after free
    bm.free(b)
    filler = seq(range(100, 116), "c")  # takes every block: evicts the cache
    computed(bm, filler)
    bm.free(filler)
    d = seq(list(range(8)) + [1], "d")
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def test_blocks_are_never_shared_across_fingerprints():
    bm_a = BlockManager(8, BS, b"model-a")
    assert block_hashes(b"model-a", list(range(8)), BS) != block_hashes(b"model-b", list(range(8)), BS)
    computed(bm_a, seq(range(9), "a"))
    bm_a.fingerprint = b"model-b"  # same pool, another model's requests
    b = seq(range(9), "b")
    bm_a.allocate(b)
    assert b.num_cached_tokens == 0


def test_half_computed_blocks_are_not_reused():
    bm = BlockManager(16, BS, FP)
    a = seq(range(13), "a")
    bm.allocate(a)
    a.num_computed_tokens = 5  # one chunk in: only block 0 complete
    bm.commit_computed(a)
    b = seq(range(13), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 4


def test_allocation_beyond_capacity_raises():
    bm = BlockManager(2, BS, FP)
    with pytest.raises(CapacityExhaustedError):
        bm.allocate(seq(range(20)))
    assert bm.num_free_blocks == 2


def test_a_prefix_held_by_a_running_sequence_is_shared_not_counted_against_the_free_blocks():
    bm = BlockManager(6, BS, FP)
    running = computed(bm, seq(range(13), "running"))  # 4 blocks, 3 of them full and cached
    sharing = seq(list(range(12)) + [99, 98, 97], "sharing")  # the 3 cached blocks, then 1 of its own
    assert bm.num_free_blocks == 2 < sharing.num_blocks
    assert bm.can_allocate(sharing)
    bm.allocate(sharing)
    assert sharing.block_table[:3] == running.block_table[:3] and bm.num_free_blocks == 1
    # A cached block nobody holds is in the free list: reusing it takes it from there.
    bm.free(running)
    bm.free(sharing)
    cold = seq(list(range(12)) + [5] * 13, "cold")  # 7 blocks, 3 cached: all 6 free ones would be taken, and 1 more
    assert not bm.can_allocate(cold)
    with pytest.raises(CapacityExhaustedError, match="7 KV blocks needed, 6 free"):
        bm.allocate(cold)
