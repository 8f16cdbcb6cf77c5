"""Host buffers for KV blocks, backed by transparent huge pages where the kernel allows.

KV pools and the KV store's slots are fresh mappings that ask for huge pages before first touch (UCX's
same-host copies run faster from them), resident only as KV is written.
Why and measured: docs/transfer.md ("UCX choices": huge pages), docs/memory.md ("Where it goes").
"""

from __future__ import annotations

import math
import mmap
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def _mapping(nbytes: int) -> mmap.mmap:
    """A fresh private mapping that asks for huge pages.

    Its own mapping, not malloc's: malloc may hand back memory already touched
    (glibc serves even tens of MB from its heap once such blocks were freed),
    and advice given after the first touch gets no huge pages. The kernel zeroes
    each page at its first write: faulting a 2 MiB page costs ~0.1 ms, against
    seconds of prefill that fill it, so nothing is faulted in ahead."""
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def zero_bytes(shape: tuple[int, ...]) -> np.ndarray:
    """Zeroed uint8 memory of `shape` in such a mapping; the KV store's slots, without torch."""
    numel = math.prod(shape)
    if numel == 0:
        return np.zeros(shape, dtype=np.uint8)
    return np.frombuffer(_mapping(numel), dtype=np.uint8).reshape(shape)  # keeps the mapping alive


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in such a mapping; a worker's KV pool."""
    import torch  # lazily: the KV store uses zero_bytes and never loads torch

    numel = math.prod(shape)
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(_mapping(numel * dtype.itemsize), dtype=dtype, count=numel).view(shape)
