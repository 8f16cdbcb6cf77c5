"""Protobuf <-> plain dataclasses, in one place, so servicers stay thin."""

from __future__ import annotations

import time

from pdserve.common.engine.outputs import EngineStats
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.sequence import FinishReason
from pdserve.common.errors import InvalidRequestError
from pdserve.common.kv.spec import KVSpec
from pdserve.common.roles import ELASTIC_ROLES
from pdserve.v1 import common_pb2 as pb

_FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}
ROLES = {
    "prefill": pb.WORKER_ROLE_PREFILL,
    "decode": pb.WORKER_ROLE_DECODE,
    "colocated": pb.WORKER_ROLE_COLOCATED,
    "both": pb.WORKER_ROLE_BOTH,
}
ROLE_NAMES = {v: k for k, v in ROLES.items()}


def elastic_role(value: int, field_name: str = "role") -> str:
    """An elastic worker's role from its protobuf value; InvalidRequestError for any other."""
    name = ROLE_NAMES.get(value)
    if name not in ELASTIC_ROLES:
        raise InvalidRequestError(
            field_name,
            f"an elastic worker's role is PREFILL, DECODE or BOTH, got "
            f"{pb.WorkerRole.Name(value) if value in ROLE_NAMES else value}",
        )
    return name


DEFAULT_MAX_TOKENS = 256


def sampling_from_pb(p: pb.SamplingParams, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
    """Unset fields take the documented defaults; bad values raise InvalidRequestError."""
    return SamplingParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else default_max_tokens,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        seed_offset=p.seed_offset,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )


def sampling_to_pb(s: SamplingParams, with_stop_strings: bool = True) -> pb.SamplingParams:
    out = pb.SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        seed_offset=s.seed_offset,
        stop=list(s.stop) if with_stop_strings else [],
    )
    if s.seed is not None:
        out.seed = s.seed
    return out


def finish_to_pb(reason: FinishReason | None) -> int:
    return _FINISH_TO_PB[reason]


def finish_from_pb(value: int) -> FinishReason | None:
    if value == pb.FINISH_REASON_ERROR:
        return None
    return _FINISH_FROM_PB[value]


def token_ids(values, field: str, vocab_size: int | None = None) -> list[int]:
    ids = list(values)
    if not ids:
        raise InvalidRequestError(field, "must not be empty")
    if min(ids) < 0:
        raise InvalidRequestError(field, "token ids must be >= 0")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise InvalidRequestError(field, f"token ids must be < {vocab_size}")
    return ids


def kv_spec_to_pb(spec: KVSpec) -> pb.KVSpec:
    return pb.KVSpec(
        model_name=spec.model_name,
        weights_digest=spec.weights_digest,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        block_size=spec.block_size,
        dtype=spec.dtype,
        fingerprint=spec.fingerprint,
    )


def load_to_pb(
    worker_id: str, role: str, stats: EngineStats, waiting_tokens: int, step_ms: float, prefill_tps: float
) -> pb.WorkerLoad:
    hit = stats.prefix_hits / stats.prefix_queries if stats.prefix_queries else 0.0
    return pb.WorkerLoad(
        worker_id=worker_id,
        role=ROLES[role],
        waiting_tokens=waiting_tokens,
        running_seqs=stats.running,
        waiting_seqs=stats.waiting,
        free_blocks=stats.free_blocks,
        total_blocks=stats.total_blocks,
        prefix_hit_rate=hit,
        prefill_tokens_per_s=prefill_tps,
        decode_step_ms=step_ms,
        measured_at_unix_ms=int(time.time() * 1000),
    )
