"""A request across its attempts (`Progress`), and one attempt on one plan (`Attempt`),
whose methods follow its life cycle. Greedy retries repeat an unfaulted run in float32
(docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field

import grpc

from pdserve.common.engine.detokenizer import IncrementalDetokenizer
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.router import policy
from pdserve.router.recovery import WorkerFailedError
from pdserve.router.worker_handle import WorkerHandle
from pdserve.v1 import common_pb2 as pb


@dataclass
class Plan:
    decode: policy.Choice
    prefill: policy.Choice | None  # None: the decode worker prefills locally
    hashes: list[bytes]


class Phase(enum.Enum):
    """The call an attempt is in (the `phase` of its failures, in logs and metrics)."""

    GENERATE = "generate"  # one call on the decode worker: prefill there, then decode
    RESERVE = "reserve"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class Progress:
    """One client request across attempts: what was asked, and what was sent."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    t0: float
    deadline: float | None = None  # time.monotonic() by which the client gives up
    generated: list[int] = field(default_factory=list)  # every token the client has been sent
    cached_tokens: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    t_first: float | None = None
    failures: list[WorkerFailedError] = field(default_factory=list)
    # What the ids workers see start with: the client's id made this request's alone (another router,
    # or the client's own resend, may use the same id; a worker may still hold an earlier one's work).
    attempt_base: str = ""

    @property
    def context(self) -> list[int]:
        """What the next attempt prefills: the prompt and every token already sent."""
        return self.prompt_ids + self.generated

    @property
    def attempt_id(self) -> str:
        """The id workers see for this attempt. A retry gets its own: what an
        earlier attempt left behind (a prefill still pushing, a reservation not
        yet released) must not collide with it."""
        n, base = len(self.failures), self.attempt_base or self.request_id
        return base if n == 0 else f"{base}.retry{n}"

    @property
    def remaining_params(self) -> SamplingParams:
        # Stop strings stay with the router's detokenizer, which sees the whole text;
        # seeded draws go on from the position the client has reached.
        return dataclasses.replace(
            self.params,
            max_tokens=self.params.max_tokens - len(self.generated),
            stop=(),
            seed_offset=self.params.seed_offset + len(self.generated),
        )

    @property
    def excluded(self) -> set[int]:
        """The workers that failed this request, by handle (`id`): a worker id may repeat (a copied config)."""
        return {id(f.worker) for f in self.failures}

    def time_left(self, limit_s: float | None) -> float | None:
        """A downstream call's timeout: `limit_s` (None: none), cut to the client's deadline."""
        if self.deadline is None:
            return limit_s
        left = max(0.0, self.deadline - time.monotonic())
        return left if limit_s is None else min(limit_s, left)

    @property
    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


@dataclass
class Attempt:
    """One attempt's state, so that cleanup and blame see how far it got. In order
    (router.py drives it):
      1. `queued`: its uncached prompt joins the first worker's queued load, which routing reads.
      2. `reserving` (disaggregated): blocks on the decode worker, which the router must release.
      3. `prefilling`: the prefill worker computes the prompt into them; a failure is its own.
      4. `decoding` or `generating`: the decode worker's stream; `answered` once it first
         answers, when the stream owns the reservation and the prompt has left the queued load.
      5. `computed` (on every way out): the queued load is given back; router.py releases a
         reservation still the router's.
    """

    plan: Plan
    rid: str  # the id workers see (Progress.attempt_id)
    context: list[int]  # what this attempt prefills (Progress.context, taken once)
    params: pb.SamplingParams  # what is left to generate
    phase: Phase = Phase.GENERATE
    reserved: bool = False  # a decode reservation to release on the way out
    stream: grpc.aio.UnaryStreamCall | None = None
    streaming: bool = False  # the decode stream has answered
    uncached: int = 0  # prompt tokens the first worker still has to compute, counted in its load
    queued_tokens: int = 0  # the whole prompt, while it counts there
    culprit: WorkerHandle | None = None  # whose failure an RPC error now would be

    def __post_init__(self) -> None:
        self.culprit = self.culprit or self.plan.decode.worker

    def queued(self) -> None:
        """The prompt's uncached part joins the first worker's queued load."""
        first = self.plan.prefill or self.plan.decode
        self.uncached = len(self.context) - first.cached_blocks * self.plan.decode.worker.info.kv_spec.block_size
        self.queued_tokens = len(self.context)
        first.worker.add_prompt(self.queued_tokens, self.uncached)

    def reserving(self) -> None:
        """Before the Reserve call: a cancel mid-call may still leave a reservation there."""
        self.phase = Phase.RESERVE
        self.reserved = True

    def prefilling(self) -> None:
        self.phase = Phase.PREFILL
        self.culprit = self.plan.prefill.worker

    def generating(self, stream: grpc.aio.UnaryStreamCall) -> None:
        self.phase = Phase.GENERATE
        self.stream = stream

    def decoding(self, stream: grpc.aio.UnaryStreamCall) -> None:
        self.phase = Phase.DECODE
        self.culprit = self.plan.decode.worker
        self.stream = stream

    def answered(self) -> None:
        """The decode stream's first answer: it owns the reservation, the prompt is computed."""
        self.streaming = True
        self.reserved = False
        self.computed()

    def blame(self, e: grpc.aio.AioRpcError) -> WorkerHandle:
        """Whose failure `e` is: a Decode call that never answered for want of its KV
        (checks failed, or it never came) is the prefill worker's: recompute without it."""
        if (
            self.phase is Phase.DECODE
            and self.plan.prefill is not None
            and not self.streaming
            and e.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
        ):
            return self.plan.prefill.worker
        return self.culprit

    def computed(self) -> None:
        """The prompt is computed (or abandoned): it leaves the first worker's queued load."""
        (self.plan.prefill or self.plan.decode).worker.prompt_done(self.queued_tokens, self.uncached)
        self.uncached = self.queued_tokens = 0
