"""Chained block hashes: the identity of a KV block for prefix reuse.

hash(block i) = H(fingerprint, hash(block i-1), token ids of block i), so a
block's hash names its whole prefix, and the model fingerprint in every link
keeps blocks of another model, dtype or block size from ever matching.
"""

from __future__ import annotations

import hashlib
from array import array

ROOT = b""
HASH_BYTES = 16


def block_hash(fingerprint: bytes, parent: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=HASH_BYTES, key=fingerprint[:64])
    h.update(parent)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def block_hashes(fingerprint: bytes, token_ids: list[int], block_size: int) -> list[bytes]:
    """Hashes of every full block of `token_ids`, in order."""
    hashes: list[bytes] = []
    parent = ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(fingerprint, parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
