"""A measured profile: an engine step's time as a linear model of five features of its
batch (`StepShape`, `fit`), plus a KV move and the router hop; keyed by model, dtype and
hardware, and refused for another (`Profile.require`). Why: docs/planning.md ("Profiles").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


class ProfileMismatchError(ValueError):
    """A profile measured for another model, dtype or device."""


@dataclass(frozen=True)
class StepShape:
    """What one engine step computes."""

    decode_seqs: int = 0  # sequences that each get one token
    decode_context: int = 0  # the sum of their context lengths
    prefill_tokens: int = 0  # prompt tokens in this step's chunks
    prefill_pairs: int = 0  # sum over chunks of chunk * (tokens before it + chunk / 2)

    def features(self) -> list[float]:
        return [1.0, self.decode_seqs, self.decode_context, self.prefill_tokens, self.prefill_pairs]

    @staticmethod
    def chunk(tokens: int, before: int) -> StepShape:
        return StepShape(prefill_tokens=tokens, prefill_pairs=int(tokens * (before + tokens / 2)))

    def __add__(self, other: StepShape) -> StepShape:
        return StepShape(
            self.decode_seqs + other.decode_seqs,
            self.decode_context + other.decode_context,
            self.prefill_tokens + other.prefill_tokens,
            self.prefill_pairs + other.prefill_pairs,
        )


@dataclass(frozen=True)
class StepModel:
    """Milliseconds of one step: the base, plus each feature of `StepShape` times its cost."""

    base_ms: float
    per_seq_ms: float
    per_context_ms: float
    per_prompt_token_ms: float
    per_pair_ms: float

    def ms(self, shape: StepShape) -> float:
        coef = (self.base_ms, self.per_seq_ms, self.per_context_ms, self.per_prompt_token_ms, self.per_pair_ms)
        return sum(c * f for c, f in zip(coef, shape.features()))


def fit(samples: list[tuple[StepShape, float]]) -> StepModel:
    """Least squares of the relative error over measured (shape, ms), every coefficient kept >= 0 (a cost is
    never negative). Relative: in absolute ms a 1.3 s prompt step outweighs a 20 ms decode step, and a
    decode step's time is what an inter-token objective is judged on."""
    if len(samples) < 5:
        raise ValueError(f"a step model needs at least 5 measured steps, not {len(samples)}")
    y = np.array([ms for _, ms in samples])
    x = np.array([s.features() for s, _ in samples]) / y[:, None]
    y = np.ones_like(y)
    keep = list(range(5))
    while True:  # drop a negative coefficient and refit: a tiny active-set NNLS
        coef = np.zeros(5)
        coef[keep] = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        negative = [i for i in keep if coef[i] < 0]
        if not negative:
            return StepModel(*(float(c) for c in coef))
        keep.remove(min(negative, key=lambda i: coef[i]))


def model_key(ref) -> str:
    """A model's name and weights digest, as profiles are keyed (`ref`: a model_loader.ModelRef)."""
    return f"{ref.name}@{ref.weights_digest[:16] or 'undigested'}"


@dataclass(frozen=True)
class Profile:
    model: str  # model_key(): the model's name and weights digest
    dtype: str
    hardware: str  # e.g. "cpu: AMD EPYC (avx512_bf16)" or "cuda: NVIDIA H200"
    block_size: int
    steps: dict[int, StepModel]  # by torch threads per worker (CPU) or 1 (a device)
    transfer_ms_per_block: float  # moving one KV block between workers
    transfer_base_ms: float  # per transfer, whatever its size
    router_hop_ms: float  # what the router adds to a request
    measured_at: str = ""
    notes: dict = field(default_factory=dict)

    def step_model(self, threads: int) -> StepModel:
        """The model for `threads`, else the nearest measured count below (or the smallest)."""
        have = sorted(self.steps)
        below = [t for t in have if t <= threads]
        return self.steps[below[-1] if below else have[0]]

    def require(self, model: str, dtype: str, hardware: str) -> None:
        """Refuse a profile of another model, dtype or device, naming both."""
        for what, mine, theirs in (
            ("model", self.model, model),
            ("dtype", self.dtype, dtype),
            ("hardware", self.hardware, hardware),
        ):
            if mine != theirs:
                raise ProfileMismatchError(
                    f"the profile was measured for {what} {mine!r}, not {theirs!r}; measure one with `pdserve profile`"
                )

    def to_json(self) -> str:
        d = asdict(self)
        d["steps"] = {str(t): asdict(m) for t, m in self.steps.items()}
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        d = json.loads(text)
        d["steps"] = {int(t): StepModel(**m) for t, m in d["steps"].items()}
        return cls(**d)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> Profile:
        return cls.from_json(Path(path).read_text())
