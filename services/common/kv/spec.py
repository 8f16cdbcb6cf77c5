"""The shape of a worker's KV cache, and the fingerprint that names it.

Two workers may exchange KV blocks only when their specs (and so their
fingerprints) are equal: the fingerprint salts every block hash, so blocks
computed by another model, dtype or block size can never be mixed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pdserve.common.errors import InvalidRequestError

# The KV wire format's version (transfer/base.py's block header), advertised in WorkerInfo:
# the router pairs prefill and decode workers only when theirs agree. 2: XXH3-128 checksums.
WIRE_VERSION = 2
UNSTATED_WIRE_VERSION = 2  # what a worker from before the field (0) speaks

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVSpec:
    model_name: str
    weights_digest: str  # hex digest of the weights (see model_loader)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}")

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """One block: [layers, 2 (k, v), block_size, kv_heads, head_dim].

        Block-major pool layout makes one block one contiguous buffer, which
        is what the transfer and the KV store move.
        """
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * _DTYPE_BYTES[self.dtype]

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def fingerprint(self) -> bytes:
        """16 bytes naming model, weights, dtype and layout."""
        text = "|".join(
            str(x)
            for x in (
                self.model_name,
                self.weights_digest,
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                self.block_size,
                self.dtype,
            )
        )
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def require_peer(self, fingerprint: bytes, field_name: str, peer: str) -> None:
        """Refuse a KV exchange unless the peer states this spec's fingerprint. Required,
        not optional: a peer that states no layout could push KV of another model."""
        if fingerprint != self.fingerprint:
            raise InvalidRequestError(
                field_name,
                f"must be the {peer}'s KVSpec fingerprint, and this worker's: "
                + ("missing" if not fingerprint else f"the {peer}'s KV layout or model differs"),
            )
