"""Device KV blocks on host transports: each block moves through its pinned host mirror.

The sender copies device blocks to their mirror blocks before the transport reads them; the receiver copies
them to the device once every block has landed and verified. Why a mirror: docs/transfer.md ("GPU pools").
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedBlock:
    """One device block and its host mirror: the transport moves `host`."""

    device: torch.Tensor
    host: torch.Tensor


def pin(host: torch.Tensor) -> bool:
    """Page-lock `host` for fast, asynchronous copies to and from the GPU.

    cudaHostRegister on memory we already own, rather than a pinned torch
    allocation: torch's pinned allocator rounds each allocation up to a power
    of two (a 40 GB mirror would take 64 GB), and this keeps the huge pages
    of host_memory.zeros. Unpinned memory still works, at pageable speed."""
    import torch  # lazily, as everywhere in the transfer package

    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(host.data_ptr(), host.nbytes, 0)
    if int(err) != 0:
        log.warning("could not pin the %d-byte KV host mirror (cuda error %s); copies run unpinned", host.nbytes, err)
        return False
    weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())
    return True


def host_buffers(buffers: list) -> list:
    """What the transport moves for each buffer: the mirror of a staged block."""
    return [b.host if isinstance(b, StagedBlock) else b for b in buffers]


def staged(buffers: list) -> list[StagedBlock]:
    return [b for b in buffers if isinstance(b, StagedBlock)]


def _copy(blocks: list[StagedBlock], to_host: bool) -> None:
    import torch

    # Stream order puts the copy after the kernels that wrote the blocks (the
    # engine's thread and this one share the device's default stream); one
    # synchronize for the lot, so the caller may reuse the source at once.
    for b in blocks:
        if to_host:
            b.host.copy_(b.device, non_blocking=True)
        else:
            b.device.copy_(b.host, non_blocking=True)
    device = blocks[0].device.device
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


async def copy_out(blocks: list[StagedBlock]) -> None:
    """Device blocks -> their mirrors (sender, before the transport reads)."""
    if blocks:
        await asyncio.to_thread(_copy, blocks, True)


async def copy_in(blocks: list[StagedBlock]) -> None:
    """Mirrors -> device blocks (receiver, after every block verified)."""
    if blocks:
        await asyncio.to_thread(_copy, blocks, False)
