"""The client's side of a request's stream: tokens recorded as sent, text made, the last event.

Tokens enter `Progress` only here, so a retry (router/attempt.py) continues
from exactly what the client has been sent; the router's detokenizer matches
stop strings, which workers never see.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pdserve.common import convert
from pdserve.common.engine.sequence import FinishReason
from pdserve.common.records import Route, Usage
from pdserve.router.attempt import Attempt, Plan, Progress
from pdserve.router.recovery import WorkerFailedError


@dataclass
class Event:
    """One step of the client stream; the last one has finish_reason set."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timing: dict[str, float] = field(default_factory=dict)
    route: Route | None = None


async def relay(progress: Progress, a: Attempt) -> AsyncIterator[Event]:
    """The decode worker's stream, as client events, to the finish."""
    async for resp in a.stream:
        if not a.streaming:
            a.answered()
            if resp.timing.kv_transfer_ms:
                progress.timing["kv_transfer_ms"] = resp.timing.kv_transfer_ms
        if resp.usage.prompt_tokens and not progress.failures:
            progress.cached_tokens = max(progress.cached_tokens, resp.usage.cached_tokens)
        ev, reason = sent(progress, list(resp.token_ids), convert.finish_from_pb(resp.finish_reason))
        if reason is not None:
            yield final(progress, reason, a.plan, ev)
            return
        yield ev
    raise WorkerFailedError(a.plan.decode.worker, a.phase.value, None, "the stream ended without finishing")


def sent(progress: Progress, tokens: list[int], reason: FinishReason | None) -> tuple[Event, FinishReason | None]:
    """Record tokens as sent: the client's event, and whether the request is now finished
    (if so, final() makes this event the last one)."""
    if progress.t_first is None and tokens:
        progress.t_first = time.perf_counter()
        progress.timing["ttft_ms"] = (progress.t_first - progress.t0) * 1e3
    detok = progress.detok
    for t in tokens:
        progress.generated.append(t)
        if not detok.stopped:
            detok.add(t)
    if detok.stopped:
        reason = FinishReason.STOP
    elif reason is None and len(progress.generated) >= progress.params.max_tokens:
        reason = FinishReason.LENGTH  # a worker that died right after the last token
    return Event(progress.request_id, tokens, detok.flush(final=detok.stopped)), reason


def final(progress: Progress, reason: FinishReason, plan: Plan, last: Event) -> Event:
    """The last event: the last tokens with the finish, usage and timing (one message, not two:
    each message costs the router and the client a fraction of a millisecond)."""
    now = time.perf_counter()
    t_first = progress.t_first or now
    timing = {**progress.timing, "decode_ms": (now - t_first) * 1e3, "total_ms": (now - progress.t0) * 1e3}
    route = Route(
        plan.prefill.worker.worker_id if plan.prefill else "", plan.decode.worker.worker_id, plan.prefill is not None
    )
    usage = Usage(len(progress.prompt_ids), len(progress.generated), progress.cached_tokens)
    return Event(
        progress.request_id, last.token_ids, last.text + progress.detok.flush(final=True), reason, usage, timing, route
    )
