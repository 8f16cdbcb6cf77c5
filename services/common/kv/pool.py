"""The preallocated KV block pool of one worker.

Block-major: `[num_blocks, layers, 2, block_size, kv_heads, head_dim]`, so
block i is the contiguous buffer `tensor[i]`, which is what moves between
workers and to the KV store. Attention writes and reads it in place.
"""
from __future__ import annotations

import torch

from pdserve.common.errors import InvalidRequestError
from pdserve.common.kv import host_memory
from pdserve.common.kv.spec import KVSpec

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def blocks_for_bytes(spec: KVSpec, num_bytes: float) -> int:
    return max(1, int(num_bytes // spec.block_bytes))


class KVPool:
    def __init__(self, spec: KVSpec, num_blocks: int, device: str | torch.device = "cpu"):
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self.spec = spec
        shape, dtype = (num_blocks, *spec.block_shape), _TORCH_DTYPES[spec.dtype]
        if torch.device(device).type == "cpu":
            self.tensor = host_memory.zeros(shape, dtype)  # huge pages: faster transfers
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.tensor.shape[0]

    def block(self, block_id: int) -> torch.Tensor:
        """A view of one block: a contiguous buffer to send or receive into."""
        return self.tensor[block_id]

    def export_blocks(self, block_ids: list[int]) -> list[memoryview]:
        """Bytes-like views of blocks, without copying (CPU pools)."""
        return [memoryview(self.tensor[b].numpy()).cast("B") for b in block_ids]

    def import_blocks(self, block_ids: list[int], buffers: list) -> None:
        if len(buffers) != len(block_ids):
            raise InvalidRequestError("buffers", f"{len(buffers)} buffers for {len(block_ids)} blocks")
        for block_id, buf in zip(block_ids, buffers):
            src = torch.frombuffer(buf, dtype=torch.uint8)
            if src.numel() != self.spec.block_bytes:
                raise InvalidRequestError("buffers", f"block of {src.numel()} bytes, expected {self.spec.block_bytes}")
            self.tensor[block_id].view(torch.uint8).view(-1).copy_(src)
