"""Per-request sampling parameters and their validation.

Validation lives here, next to the fields, so every entry point (engine API,
gRPC, HTTP) rejects the same bad input with the same field names.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

from pdserve.common.errors import InvalidRequestError


def without_vllm_offs(name: str, value: object) -> object:
    """vLLM's clients send -1 for "off" (top_k, seed); the wire types (uint32, uint64)
    have no negatives: top_k -1 is 0, seed -1 is unseeded, other negative seeds their 64-bit pattern."""
    if name == "top_k" and isinstance(value, int) and value == -1:
        return 0
    if name == "seed" and isinstance(value, int) and -(2**63) <= value < 0:
        return None if value == -1 else value + 2**64
    return value


def as_float32(value: float) -> float:
    """`value` as the wire's float32 carries it to the workers (1e39: inf, 1e-46: 0)."""
    return array("f", [value])[0]


# Below it a temperature samples as greedy, as vLLM's (1e-5): dividing by it could overflow to a NaN
# probability, which fails the step and every request in it.
GREEDY_BELOW = 1e-5
MAX_STOP = 64  # stop strings, and stop token ids (OpenAI takes 4 strings; vLLM has no limit)
MAX_STOP_CHARS = 1024


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 (below GREEDY_BELOW) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, as vLLM) means no top-k cut
    seed: int | None = None  # None (or -1, as vLLM) means unseeded; other negatives: their 64-bit pattern
    seed_offset: int = 0  # output position of the first draw (a resumed stream: tokens already out)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists from callers but keep the dataclass hashable and frozen.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "top_k", without_vllm_offs("top_k", self.top_k))
        object.__setattr__(self, "seed", without_vllm_offs("seed", self.seed))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens < 2**32:
            raise InvalidRequestError("max_tokens", f"must be an integer in [1, 2**32), got {self.max_tokens!r}")
        # Checked as the workers will get them (float32): a value only the router took broke a stream.
        if not 0.0 <= as_float32(self.temperature) < math.inf:  # also rejects NaN
            raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not 0.0 < as_float32(self.top_p) <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**32:
            raise InvalidRequestError("top_k", f"must be -1 or 0 (off), or in [1, 2**32), got {self.top_k!r}")
        # Bounds are the wire types' (uint32, uint64): a client error, not a failed encode.
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise InvalidRequestError("seed", f"must be -1 (off), or in [-2**63, 2**64), got {self.seed!r}")
        if not isinstance(self.seed_offset, int) or not 0 <= self.seed_offset < 2**32:
            raise InvalidRequestError("seed_offset", f"must be an integer in [0, 2**32), got {self.seed_offset!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        # Bounded: each is matched at every token, on the router's event loop and in the engine's step.
        if len(self.stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequestError("stop", f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", "must be non-negative integers")
        if len(self.stop_token_ids) > MAX_STOP:
            raise InvalidRequestError("stop_token_ids", f"at most {MAX_STOP} token ids")
