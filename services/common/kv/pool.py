"""The preallocated KV block pool of one worker, block-major: block i is one contiguous buffer.

Attention writes and reads it in place; workers and the KV store move whole blocks. On a GPU it also keeps
a pinned host mirror (`host`), which transfer/staging.py copies each block through.
Why: docs/engine.md ("Paged attention through transformers"), docs/transfer.md ("GPU pools").
"""

from __future__ import annotations

import torch

from pdserve.common.errors import InvalidRequestError
from pdserve.common.kv import host_memory
from pdserve.common.kv.spec import KVSpec
from pdserve.common.transfer.staging import StagedBlock, pin

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def blocks_for_bytes(spec: KVSpec, num_bytes: float) -> int:
    return max(1, int(num_bytes // spec.block_bytes))


class KVPool:
    def __init__(self, spec: KVSpec, num_blocks: int, device: str | torch.device = "cpu"):
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self.spec = spec
        shape, dtype = (num_blocks, *spec.block_shape), _TORCH_DTYPES[spec.dtype]
        self.host: torch.Tensor | None = None  # the staging mirror of a device pool
        self.pinned = False  # whether that mirror is page-locked
        if torch.device(device).type == "cpu":
            self.tensor = host_memory.zeros(shape, dtype)  # huge pages: faster transfers
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)
            self.host = host_memory.zeros(shape, dtype)
            self.pinned = pin(self.host)

    @property
    def num_blocks(self) -> int:
        return self.tensor.shape[0]

    def block(self, block_id: int) -> torch.Tensor | StagedBlock:
        """One block, to send or receive into: a contiguous view on the CPU; on a
        device, the view with its host mirror block (staged by the transfer layer)."""
        if self.host is None:
            return self.tensor[block_id]
        return StagedBlock(self.tensor[block_id], self.host[block_id])

    def export_blocks(self, block_ids: list[int]) -> list[memoryview]:
        """Bytes-like views of blocks: no copy on the CPU, a host copy from a device. Viewed as
        bytes before numpy, which has no bfloat16."""
        return [memoryview(self.tensor[b].cpu().view(torch.uint8).numpy()).cast("B") for b in block_ids]

    def import_blocks(self, block_ids: list[int], buffers: list) -> None:
        if len(buffers) != len(block_ids):
            raise InvalidRequestError("buffers", f"{len(buffers)} buffers for {len(block_ids)} blocks")
        for block_id, buf in zip(block_ids, buffers):
            src = torch.frombuffer(buf, dtype=torch.uint8)
            if src.numel() != self.spec.block_bytes:
                raise InvalidRequestError("buffers", f"block of {src.numel()} bytes, expected {self.spec.block_bytes}")
            self.tensor[block_id].view(torch.uint8).view(-1).copy_(src)
