"""Host buffers in transparent huge pages where the kernel allows.

KV pools and the KV store's slots are fresh mappings that ask for huge pages before first touch (UCX's
same-host copies run faster from them), resident only as KV is written. Model weights start on 4 KB
pages, which fault in 2-4x faster, and are collapsed into huge pages later, off a worker's start path.
Why and measured: docs/transfer.md ("UCX choices": huge pages), docs/memory.md ("Where it goes"),
docs/engine.md ("Weights in huge pages").
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # Linux 6.1+; Python 3.11's mmap module doesn't name it


def _mapping(nbytes: int, huge_pages: bool = True) -> mmap.mmap:
    """A fresh private mapping that asks for huge pages (huge_pages=False: for 4 KB ones).

    Its own mapping, not malloc's: malloc may hand back memory already touched
    (glibc serves even tens of MB from its heap once such blocks were freed),
    and advice given after the first touch gets no huge pages. The kernel zeroes
    each page at its first write: faulting a 2 MiB page costs ~0.1 ms, against
    seconds of prefill that fill it, so nothing is faulted in ahead."""
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE"
    if hasattr(mmap, advice):  # Linux
        buf.madvise(getattr(mmap, advice))
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


def trim_heap() -> None:
    """Hands the heap's free memory back to the kernel (glibc's malloc_trim): copies freed while a
    model loads stay resident otherwise. Nothing where there is no glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def collapsible(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of `numel` on 4 KB pages, starting on a huge-page boundary, so
    that collapse() can later move every 2 MiB of it into a huge page."""
    import torch

    nbytes = numel * dtype.itemsize
    buf = _mapping(nbytes + HUGE_PAGE, huge_pages=False)  # 4 KB even where every mapping gets huge pages
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = -start % HUGE_PAGE
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype)


def collapse(t: torch.Tensor) -> str:
    """Moves the whole 2 MiB pages inside t's memory into huge pages now (MADV_COLLAPSE; seconds of
    this thread for GBs, on the kernel's side of the call, which ctypes makes without the GIL).
    "" when done, else why not (a kernel before 6.1, huge pages off, none free)."""
    begin = t.data_ptr()
    start = -(-begin // HUGE_PAGE) * HUGE_PAGE
    end = (begin + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return "smaller than a huge page"
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "no transparent huge pages on this OS"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for advice, name in ((mmap.MADV_HUGEPAGE, "MADV_HUGEPAGE"), (MADV_COLLAPSE, "MADV_COLLAPSE")):
        if libc.madvise(start, end - start, advice) != 0:
            code = ctypes.get_errno()
            return f"madvise({name}): {errno.errorcode.get(code, code)}"
    return ""
