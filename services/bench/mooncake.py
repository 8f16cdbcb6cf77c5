"""Traces in the public Mooncake format, and prompts that share their prefixes.

One JSON object a line, `{"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [46, 47, ...]}`;
a hash id is one 512-token block, equal ids equal blocks (docs/benchmarks.md, "Load generator").
`python -m pdserve.bench.mooncake --out mooncake_trace.jsonl` writes a synthetic trace (`synthesize`).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pdserve.common.config import ServiceConfig, option

BLOCK_TOKENS = 512
MAX_BLOCKS = 16  # synthesize(): the longest conversation, 8,192 tokens


@dataclass(frozen=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


class TraceError(ValueError):
    """A trace file that cannot be read or is not in the format; one line, for the command line."""


def read_trace(path: str | Path) -> list[TraceRecord]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    out.append(
                        TraceRecord(
                            float(obj.get("timestamp", 0)),
                            int(obj["input_length"]),
                            int(obj["output_length"]),
                            tuple(int(h) for h in obj.get("hash_ids", ())),
                        )
                    )
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise TraceError(f"{path}:{line_no}: not a Mooncake trace record ({e!s})") from None
    except (OSError, UnicodeDecodeError) as e:
        hint = (
            " (python -m pdserve.bench.mooncake --out FILE writes a sample)" if isinstance(e, FileNotFoundError) else ""
        )
        raise TraceError(f"trace {path}: {getattr(e, 'strerror', None) or e}{hint}") from None
    return out


def write_trace(records: list[TraceRecord], out: TextIO) -> None:
    for r in records:
        out.write(
            json.dumps(
                {
                    "timestamp": round(r.timestamp_ms),
                    "input_length": r.input_length,
                    "output_length": r.output_length,
                    "hash_ids": list(r.hash_ids),
                }
            )
            + "\n"
        )


def synthesize(n: int, *, rate: float = 1.0, seed: int = 0, block_tokens: int = BLOCK_TOKENS) -> list[TraceRecord]:
    """A synthetic trace shaped like a chat service's: four shared system prompts
    (1-4 blocks), conversations whose every turn resends the whole history (its
    hash ids extend the previous turn's by 1-3 blocks, up to MAX_BLOCKS), outputs of
    16-256 tokens, Poisson arrivals at `rate` per second. Same arguments, same trace."""
    rng = random.Random(seed)
    ids = itertools.count()
    systems = [[next(ids) for _ in range(rng.randint(1, 4))] for _ in range(4)]
    conversations: list[list[int]] = []
    out, t = [], 0.0
    for _ in range(n):
        if not conversations or rng.random() < 0.3:
            conversations.append(list(rng.choice(systems)))
        i = rng.randrange(len(conversations))
        history = conversations[i]
        grow = min(rng.randint(1, 3), MAX_BLOCKS - len(history))
        history += [next(ids) for _ in range(grow)]  # the last answer and the new question
        if len(history) == MAX_BLOCKS:
            conversations.pop(i)  # this turn is its last
        prompt = (len(history) - 1) * block_tokens + rng.randint(1, block_tokens)  # its last block partly filled
        out.append(TraceRecord(round(t * 1000), prompt, rng.randint(16, 256), tuple(history)))
        t += rng.expovariate(rate)
    return out


class PrefixBlocks:
    """One deterministic block of token ids in [low, high) per hash id."""

    def __init__(self, block_tokens: int = BLOCK_TOKENS, salt: int = 0, token_range: tuple[int, int] = (100, 32000)):
        self.block_tokens = block_tokens
        self.salt = salt
        self.token_range = token_range
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


@dataclass(frozen=True)
class SampleTraceConfig(ServiceConfig):
    """Write a synthetic Mooncake-format trace (JSON lines)."""

    env_prefix = "PDSERVE_MOONCAKE_"
    num_requests: int = option(200, help="records")
    rate: float = option(1.0, help="arrivals per second (Poisson), in the timestamps")
    seed: int = option(0, help="same seed, same trace")
    out: str = option("-", help="file to write (-: stdout)")

    def validate(self) -> None:
        if self.num_requests < 1 or not self.rate > 0:
            raise ValueError("num_requests must be >= 1 and rate > 0")


def main(argv: list[str] | None = None) -> None:
    config = SampleTraceConfig.from_argv(argv, prog="python -m pdserve.bench.mooncake")
    records = synthesize(config.num_requests, rate=config.rate, seed=config.seed)
    if config.out == "-":
        write_trace(records, sys.stdout)
        return
    with open(config.out, "w", encoding="utf-8") as f:
        write_trace(records, f)


if __name__ == "__main__":
    main()
