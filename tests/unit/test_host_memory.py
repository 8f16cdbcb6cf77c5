"""Host KV memory asks for transparent huge pages: UCX moves blocks between
processes ~1.4x faster from 2 MiB pages than from 4 KiB ones (docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch

from pdserve.common.kv import host_memory
from pdserve.common.kv.pool import KVPool
from pdserve.common.kv.spec import KVSpec
from pdserve.kvstore.store import BlockStore

MIB = 1 << 20


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0]


def _smaps_bytes(t: torch.Tensor, field: str = "AnonHugePages:") -> int:
    """Bytes of `t`'s address range that smaps counts under `field` (default: mapped with huge pages)."""
    lo, hi, total, inside = t.data_ptr(), t.data_ptr() + t.nbytes, 0, False
    with open("/proc/self/smaps") as f:
        lines = f.readlines()
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start < hi and end > lo
        elif inside and head == field:
            total += int(line.split()[1]) * 1024
    return total


needs_thp = pytest.mark.skipif(
    _thp_mode() not in ("always", "madvise"), reason=f"transparent huge pages are {_thp_mode() or 'absent'} here"
)


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
    assert _smaps_bytes(pool.tensor) >= (pool.tensor.nbytes - 4 * MIB) // 2


@needs_thp
def test_the_kv_store_slots_are_backed_by_huge_pages():
    store = BlockStore(capacity_blocks=32, block_bytes=737_280)
    store.slots.fill(1)  # bytes in numpy: the store has no torch
    assert _smaps_bytes(torch.from_numpy(store.slots)) >= (store.slots.nbytes - 4 * MIB) // 2


def test_a_kv_pool_takes_memory_only_as_its_blocks_are_written():
    spec = KVSpec("SmolLM2-135M-Instruct", "test", num_layers=30, num_kv_heads=3, head_dim=64)
    pool = KVPool(spec, 256)  # 189 MB reserved
    assert _smaps_bytes(pool.tensor, "Rss:") < 8 * MIB
    pool.tensor[:16].fill_(1.0)  # 11.8 MB of KV written
    assert 8 * MIB < _smaps_bytes(pool.tensor, "Rss:") < 32 * MIB
    assert int(pool.tensor[16:].count_nonzero()) == 0
