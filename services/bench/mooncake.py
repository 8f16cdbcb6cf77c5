"""Traces in the public Mooncake format, and prompts that share their prefixes.

One JSON object a line:

    {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

`timestamp` is milliseconds from the trace's start. Each hash id stands for
one 512-token block of the prompt, and equal ids are equal blocks (a shared
prefix), so a prompt here is one deterministic token block per id, joined
and cut to input_length: two requests sharing ids share those token blocks
exactly, and a prefix cache sees the reuse the trace recorded.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def read_trace(path: str | Path) -> list[TraceRecord]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append(TraceRecord(float(obj.get("timestamp", 0)), int(obj["input_length"]),
                                       int(obj["output_length"]), tuple(int(h) for h in obj.get("hash_ids", ()))))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{line_no}: not a Mooncake trace record ({e!s})") from None
    return out


class PrefixBlocks:
    """One deterministic block of token ids in [low, high) per hash id."""

    def __init__(self, block_tokens: int = BLOCK_TOKENS, salt: int = 0, token_range: tuple[int, int] = (100, 32000)):
        self.block_tokens, self.salt, self.token_range = block_tokens, salt, token_range
        self._cache: dict[int, list[int]] = {}

    def _tokens(self, n: int, seed: str) -> list[int]:
        rng = random.Random(seed)  # str seeds hash the same in every process
        return [rng.randrange(*self.token_range) for _ in range(n)]

    def block(self, hash_id: int) -> list[int]:
        b = self._cache.get(hash_id)
        if b is None:
            b = self._cache[hash_id] = self._tokens(self.block_tokens, f"{self.salt}:{hash_id}")
        return b

    def prompt(self, record: TraceRecord, index: int) -> list[int]:
        ids = [t for h in record.hash_ids for t in self.block(h)][: record.input_length]
        if len(ids) < record.input_length:  # fewer ids than blocks: the rest is this request's own
            ids += self._tokens(record.input_length - len(ids), f"{self.salt}:tail:{index}")
        return ids
