"""Host KV memory asks for transparent huge pages: UCX moves blocks between
processes ~1.4x faster from 2 MiB pages than from 4 KiB ones (docs/benchmarks.md).
Model weights start on 4 KB pages, quick to fault in, and are collapsed into huge
ones once a worker is warm (docs/engine.md, "Weights in huge pages")."""

from __future__ import annotations

import pytest
import torch

from pdserve.common.kv import host_memory
from pdserve.common.kv.pool import KVPool
from pdserve.common.kv.spec import KVSpec
from pdserve.kvstore.store import BlockStore
from tests.smaps import mapped_bytes, needs_thp

MIB = 1 << 20


def test_host_buffers_are_zeroed_whatever_the_page_size():
    t = host_memory.zeros((5, 3 * MIB + 7), torch.uint8)
    assert t.shape == (5, 3 * MIB + 7) and int(t.count_nonzero()) == 0
    small = host_memory.zeros((3,), torch.float32)  # under one huge page: plain memory
    assert small.tolist() == [0.0, 0.0, 0.0]


@needs_thp
def test_a_host_kv_pool_is_backed_by_huge_pages_even_where_malloc_has_memory_to_reuse():
    # glibc raises its mmap threshold once a large mmapped block is freed; the next
    # such block then comes from the heap, is touched, and stays there when freed,
    # for malloc to hand back (what a worker's process looks like after start-up).
    for _ in range(2):
        scratch = torch.ones(6_000_000)  # 24 MB, more than the pool below
        del scratch
    spec = KVSpec("SmolLM2-135M-Instruct", "test", num_layers=30, num_kv_heads=3, head_dim=64)
    pool = KVPool(spec, 32)  # 23.6 MB
    pool.tensor.fill_(1.0)  # pages are faulted in by their first write, as attention and transfers do
    # The 2 MiB-aligned interior asks; the kernel may still fall back page by page
    # when memory is fragmented, so most of it, not all.
    assert mapped_bytes(pool.tensor) >= (pool.tensor.nbytes - 4 * MIB) // 2


@needs_thp
def test_the_kv_store_slots_are_backed_by_huge_pages():
    store = BlockStore(capacity_blocks=32, block_bytes=737_280)
    store.slots.fill(1)  # bytes in numpy: the store has no torch
    assert mapped_bytes(torch.from_numpy(store.slots)) >= (store.slots.nbytes - 4 * MIB) // 2


def test_a_kv_pool_takes_memory_only_as_its_blocks_are_written():
    spec = KVSpec("SmolLM2-135M-Instruct", "test", num_layers=30, num_kv_heads=3, head_dim=64)
    pool = KVPool(spec, 256)  # 189 MB reserved
    assert mapped_bytes(pool.tensor, "Rss:") < 8 * MIB
    pool.tensor[:16].fill_(1.0)  # 11.8 MB of KV written
    assert 8 * MIB < mapped_bytes(pool.tensor, "Rss:") < 32 * MIB
    assert int(pool.tensor[16:].count_nonzero()) == 0


@needs_thp
def test_collapsible_memory_starts_on_small_pages_and_collapses_into_huge_ones_unchanged():
    t = host_memory.collapsible(3 * MIB, torch.float32)  # 12 MiB: six huge pages
    assert t.data_ptr() % host_memory.HUGE_PAGE == 0 and t.nbytes == 12 * MIB
    t.copy_(torch.arange(3 * MIB, dtype=torch.float32))
    assert mapped_bytes(t) == 0  # 4 KB pages, even where every mapping gets huge ones
    why = host_memory.collapse(t)
    if "EINVAL" in why:
        pytest.skip(f"this kernel can't collapse pages ({why}): Linux 6.1+ can")
    assert why == "" and mapped_bytes(t) == t.nbytes
    assert torch.equal(t, torch.arange(3 * MIB, dtype=torch.float32))


def test_memory_smaller_than_a_huge_page_is_not_collapsed_and_says_why():
    assert host_memory.collapse(torch.ones(1000)) == "smaller than a huge page"
