"""Per-request TTFT, ITL, TPOT, latency, outcome and SLO metrics, measured once on
`Router.generate()`'s events for both front ends, plus a log line per finished request
(never the prompt or the output). Definitions: docs/observability.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

from pdserve.common import logs, metrics
from pdserve.common.errors import PdserveError
from pdserve.common.grpc_errors import status_code_for
from pdserve.common.records import Route, Usage
from pdserve.router.router import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestMetrics:
    """Service-level objectives, in milliseconds (0: not tracked)."""

    slo_ttft_ms: float = 0.0
    slo_tpot_ms: float = 0.0

    def scores(self, outcome: str, ttft: float | None, tpot: float | None, waited: float) -> dict[str, bool]:
        """Each tracked objective's result for a request that ended with `outcome` (a finish reason or a
        status name) after `waited` s; an objective is scored only once its result is known. A request
        that failed missed what it had not met: a ratio of finished requests alone would rise as the
        system sheds load. One cancelled by its client, or past its client's deadline, is scored on its
        first token, or on its wait once that passed the objective; one refused for its own input, not at
        all."""
        out: dict[str, bool] = {}
        if outcome in _REQUESTS_OWN:
            return out
        # A client's own deadline reaches the router as deadline_exceeded (relayed from the calls it bounds).
        finished, cancelled = outcome in ("stop", "length"), outcome in ("cancelled", "abort", "deadline_exceeded")
        if self.slo_ttft_ms > 0:
            if ttft is not None:
                out["ttft"] = ttft * 1e3 <= self.slo_ttft_ms
            elif not finished and (not cancelled or waited * 1e3 > self.slo_ttft_ms):
                out["ttft"] = False
        if self.slo_tpot_ms > 0:
            if finished and tpot is not None:
                out["tpot"] = tpot * 1e3 <= self.slo_tpot_ms
            elif not finished and not cancelled:
                out["tpot"] = False
        return out

    @staticmethod
    @contextlib.contextmanager
    def refusals() -> Iterator[None]:
        """Around a front end's checks before a request is taken (a bad field, an unknown model,
        draining): a refusal is counted by its status, as a failure after it would be; no latency,
        which a refusal doesn't have."""
        try:
            yield
        except PdserveError as e:
            metrics.REQUESTS.add(1, {"outcome": status_code_for(e).name.lower()})
            raise

    async def observe(
        self, events: AsyncIterator[Event], attributes: Mapping[str, str] | None = None
    ) -> AsyncIterator[Event]:
        """`events`, measured; `attributes` (Router.genai_attributes) go on TTFT, TPOT and duration."""
        t0 = time.perf_counter()
        attributes = dict(attributes or {})
        first = last = None  # times of the first and the latest token
        tokens = 0
        outcome = "cancelled"  # the consumer stopped iterating (client gone)
        request_id = ""
        final, t_end = None, 0.0  # the last event with a finish reason; when the first one came
        try:
            async with contextlib.aclosing(events):  # closing this closes the router's stream at once
                async for ev in events:
                    now = time.perf_counter()
                    if not request_id:
                        request_id = ev.request_id
                        logs.bind_request(request_id)
                    if ev.token_ids:
                        if first is None:
                            first = now
                            metrics.TTFT.record(now - t0, attributes)
                        else:
                            gap = (now - last) / len(ev.token_ids)
                            for _ in ev.token_ids:
                                metrics.ITL.record(gap)
                        last = now
                        tokens += len(ev.token_ids)
                    if ev.finish_reason is not None:
                        # The last event: its tokens (counted above), usage and route.
                        outcome = ev.finish_reason.value
                        final, t_end = ev, t_end or now
                    yield ev
        except Exception as e:
            outcome = status_code_for(e).name.lower()
            raise
        finally:
            if final is not None:
                self._finished(final, t0, t_end, first, last, tokens, attributes)
            else:  # failed or cancelled: its duration too, with what ended it (the conventions' error.type)
                waited = time.perf_counter() - t0
                metrics.E2E.record(waited, {**attributes, "error.type": outcome})
                _count_slo(self.scores(outcome, None if first is None else first - t0, None, waited))
            metrics.REQUESTS.add(1, {"outcome": outcome})
            metrics.TOKENS.add(tokens, {"type": "generation"})
            if outcome not in ("stop", "length"):
                log.info(
                    "request ended: %s",
                    outcome,
                    extra={"outcome": outcome, "output_tokens": tokens, "duration_ms": _ms(time.perf_counter() - t0)},
                )

    def _finished(
        self,
        ev: Event,
        t0: float,
        now: float,
        first: float | None,
        last: float | None,
        tokens: int,
        attributes: dict[str, str],
    ) -> None:
        metrics.E2E.record(now - t0, attributes)
        tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
        if tpot is not None:
            metrics.TPOT.record(tpot, attributes)
        ttft = first - t0 if first is not None else None
        _count_slo(self.scores(ev.finish_reason.value, ttft, tpot, now - t0))
        route = ev.route or Route("", "", False)
        if route.prefill_worker_id:
            metrics.ROUTED.add(1, {"role": "prefill", "worker_id": route.prefill_worker_id})
        if route.decode_worker_id:
            metrics.ROUTED.add(1, {"role": "decode", "worker_id": route.decode_worker_id})
        usage = ev.usage or Usage(0, tokens)
        metrics.TOKENS.add(usage.prompt_tokens, {"type": "prompt"})
        metrics.TOKENS.add(usage.cached_tokens, {"type": "cached"})
        log.info(
            "request finished: %s",
            ev.finish_reason.value,
            extra={
                "outcome": ev.finish_reason.value,
                "prompt_tokens": usage.prompt_tokens,
                "output_tokens": usage.completion_tokens,
                "cached_tokens": usage.cached_tokens,
                "ttft_ms": _ms(ttft),
                "tpot_ms": _ms(tpot),
                "duration_ms": _ms(now - t0),
                "prefill_worker": route.prefill_worker_id,
                "decode_worker": route.decode_worker_id,
            },
        )


# Errors of the request's own making: no objective is scored on them, as on a refusal.
_REQUESTS_OWN = frozenset({"invalid_argument", "not_found", "failed_precondition", "unauthenticated", "out_of_range"})


def _count_slo(scores: dict[str, bool]) -> None:
    for objective, attained in scores.items():
        metrics.SLO.add(1, {"objective": objective, "attained": str(attained).lower()})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
