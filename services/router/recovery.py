"""What survives a worker failure: a request's progress, and which failures retry.

A request's stream is made of attempts. Each attempt runs on one plan (a
decode worker, maybe a prefill worker); when a worker fails, the router
plans again without it and continues from `Progress.context` (the prompt plus
every token already sent), so the client sees one stream with no token lost
or repeated. Greedy decoding gives the same tokens as an unfaulted run,
because the re-prefilled context is exactly the one decode would have had;
in float32, that is: in bfloat16 a re-prefill rounds unlike the decode steps
it replaces and may flip a near tie (docs/reliability.md).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import grpc

from pdserve.common.engine.detokenizer import IncrementalDetokenizer
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.router.plan import Plan
from pdserve.router.worker_pool import Worker
from pdserve.v1 import common_pb2 as pb

# A worker's failure, not the request's: another worker may well succeed.
# (INVALID_ARGUMENT and FAILED_PRECONDITION are the request's; retrying cannot help.)
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,  # process gone, connection refused or reset, draining
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a per-attempt deadline, not the client's (checked first)
    grpc.StatusCode.ABORTED,  # KV transfer failed: ticket, size or checksum
    grpc.StatusCode.NOT_FOUND,  # the decode reservation expired before Decode claimed it
    grpc.StatusCode.CANCELLED,  # cancelled by the worker's side (the router's own cancel never gets here)
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # this worker's queue is full; another's may not be
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
})


class WorkerFailedError(Exception):
    """An attempt failed because of `worker`; the router may retry elsewhere."""

    def __init__(self, worker: Worker, phase: str, cause: grpc.aio.AioRpcError | None, detail: str = ""):
        self.worker, self.phase, self.cause = worker, phase, cause
        what = detail or (f"{cause.code().name}: {cause.details()}" if cause is not None else "failed")
        super().__init__(f"{phase} on {worker.worker_id}: {what}")


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

    @property
    def context(self) -> list[int]:
        """What the next attempt prefills: the prompt and every token already sent."""
        return self.prompt_ids + self.generated

    @property
    def attempt_id(self) -> str:
        """The id workers see for this attempt. A retry gets its own: what an
        earlier attempt left behind (a prefill still pushing, a reservation not
        yet released) must not collide with it."""
        n = len(self.failures)
        return self.request_id if n == 0 else f"{self.request_id}.retry{n}"

    @property
    def remaining_params(self) -> SamplingParams:
        # Stop strings stay with the router's detokenizer, which sees the whole text;
        # seeded draws go on from the position the client has reached.
        return dataclasses.replace(self.params, max_tokens=self.params.max_tokens - len(self.generated), stop=(),
                                   seed_offset=self.params.seed_offset + len(self.generated))

    @property
    def excluded(self) -> set[str]:
        return {f.worker.worker_id for f in self.failures}

    def time_left(self, limit_s: float) -> float:
        """A downstream call's timeout: `limit_s`, cut to the client's deadline."""
        if self.deadline is None:
            return limit_s
        return max(0.0, min(limit_s, self.deadline - time.monotonic()))

    @property
    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


@dataclass
class Attempt:
    """One attempt's state, so that cleanup and blame see how far it got."""

    plan: Plan
    rid: str  # the id workers see (Progress.attempt_id)
    context: list[int]  # what this attempt prefills (Progress.context, taken once)
    params: pb.SamplingParams  # what is left to generate
    culprit: Worker  # whose failure an RPC error would be
    phase: str = "decode"
    reserved: bool = False  # a decode reservation to release on the way out
    stream: grpc.aio.UnaryStreamCall | None = None
    streaming: bool = False  # the decode stream has answered
    uncached: int = 0  # prompt tokens the first worker still has to compute, counted in its load

    def queued(self) -> None:
        """The prompt's uncached part joins the first worker's queued load (routing reads it)."""
        first = self.plan.prefill or self.plan.decode
        self.uncached = len(self.context) - first.cached_blocks * self.plan.decode.worker.info.kv_spec.block_size
        first.worker.inflight_tokens += self.uncached

    def computed(self) -> None:
        """The prompt is computed (or abandoned): it leaves the first worker's queued load."""
        (self.plan.prefill or self.plan.decode).worker.inflight_tokens -= self.uncached
        self.uncached = 0


def failure(worker: Worker, phase: str, e: grpc.aio.AioRpcError, progress: Progress) -> Exception:
    """The exception for a downstream call's error: retryable or the request's own."""
    if e.code() in RETRYABLE and not progress.deadline_passed:
        return WorkerFailedError(worker, phase, e)
    return e
