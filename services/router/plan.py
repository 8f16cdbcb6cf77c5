"""Where one attempt of a request runs: a decode worker, and maybe a prefill worker.

`choose()` prices the candidates with pdserve.router.policy; the router calls it
once per attempt, leaving out the workers that have already failed the request.
"""

from __future__ import annotations

from pdserve.common import metrics, tracing
from pdserve.common.errors import NotReadyError
from pdserve.common.kv.hashing import block_hashes
from pdserve.router import policy
from pdserve.router.attempt import Plan
from pdserve.router.worker_handle import WorkerHandle
from pdserve.router.worker_pool import WorkerPool


def choose(
    pool: WorkerPool,
    index: policy.PrefixIndex,
    ids: list[int],
    exclude: set[int] = frozenset(),
    *,
    mode: str,
    local_prefill: str,
    hop_ms: float,
) -> Plan:
    """Where this context runs, avoiding workers that already failed it (`exclude`: their handles'
    ids); `hop_ms` is the measured extra latency of the disaggregated path (0: not measured yet)."""
    decoders = [w for w in pool.decode if w.routable and id(w) not in exclude]
    if not decoders:
        raise NotReadyError("no healthy decode worker")  # with exclusions, generate() reports the last failure
    spec = decoders[0].info.kv_spec
    hashes = block_hashes(spec.fingerprint, ids, spec.block_size)
    decode = policy.cheapest(decoders, index, hashes, len(ids), spec.block_size)
    if mode == "colocated" or local_prefill == "always":
        return Plan(decode, None, hashes)
    healthy = [w for w in pool.prefill if w.routable and id(w) not in exclude]
    # Only a prefill worker of the decode worker's KV layout, model and wire format can fill
    # its blocks (a fleet in the middle of an upgrade has two of each): else prefill locally.
    # An elastic worker in role both is never its own prefill worker: it prefills locally.
    prefillers = [w for w in healthy if not unpaired(w, decode.worker) and w is not decode.worker]
    for reason in filter(None, (unpaired(w, decode.worker) for w in healthy)):
        metrics.PAIRS_SKIPPED.add(1, {"reason": reason})
    if not prefillers:  # none left, none of its layout, or recovering: the decode worker computes
        return Plan(decode, None, hashes)
    prefill = policy.cheapest(prefillers, index, hashes, len(ids), spec.block_size)
    if local_prefill == "auto":
        hop = hop_ms or 1.5 * (decode.worker.rtt_ms + prefill.worker.rtt_ms)
        uncached = len(ids) - decode.cached_blocks * spec.block_size
        local_ms = policy.local_prefill_cost_ms(decode, uncached)
        remote_ms = policy.remote_prefill_cost_ms(prefill, hop)
        tracing.annotate(**{"route.local_prefill_cost_ms": local_ms, "route.remote_prefill_cost_ms": remote_ms})
        if policy.prefer_local(local_ms, remote_ms):
            return Plan(decode, None, hashes)
    return Plan(decode, prefill, hashes)


def unpaired(prefill: WorkerHandle, decode: WorkerHandle) -> str:
    """Why these two never exchange KV ("kv_layout", "kv_wire_version"), or "" when they may."""
    if prefill.fingerprint != decode.fingerprint:
        return "kv_layout"
    return "kv_wire_version" if prefill.wire_version != decode.wire_version else ""


def pairing_gap(pool: WorkerPool, w: WorkerHandle) -> str:
    """Why `w` is paired with no healthy worker of the other phase ("" when it is, or has none to pair with)."""
    others = pool.decode if w in pool.prefill else pool.prefill
    others = [o for o in others if o.routable]
    reasons = {unpaired(w, o) if w in pool.prefill else unpaired(o, w) for o in others}
    if not others or "" in reasons:
        return ""
    if reasons == {"kv_wire_version"}:
        theirs = sorted({o.wire_version for o in others})
        return f"KV wire version {w.wire_version}; the other phase's workers speak {theirs}"
    return "another KV layout (model, dtype or block size) than every worker of the other phase"


def annotate_route(span: tracing.Span, plan: Plan, attempt: int) -> None:
    """The routing decision on the request's span (a retry's replaces the first's)."""
    decode, prefill = plan.decode, plan.prefill
    tracing.annotate(
        span,
        **{
            "route.attempt": attempt,
            "route.disaggregated": prefill is not None,
            "route.decode_worker_id": decode.worker.worker_id,
            "route.decode_cost_ms": decode.cost_ms,
            "route.decode_cached_blocks": decode.cached_blocks,
            "route.prefill_worker_id": prefill.worker.worker_id if prefill else "",
            "route.prefill_cost_ms": prefill.cost_ms if prefill else None,
            "route.prefill_cached_blocks": prefill.cached_blocks if prefill else None,
        },
    )
