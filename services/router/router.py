"""The router's request flow: tokenize, plan (`plan.py`), relay tokens (`relay.py`), own
the text (detokenize once, match stop strings). Whatever ends a request, every downstream
call is cancelled and every reservation released before `generate()` returns.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from pdserve.common import convert, logs, tracing
from pdserve.common.engine.detokenizer import IncrementalDetokenizer
from pdserve.common.errors import CapacityExhaustedError, NotFoundError, NotReadyError
from pdserve.common.grpc_errors import relayed_error
from pdserve.router import policy
from pdserve.router.attempt import Attempt, Phase, Plan, Progress
from pdserve.router.models import genai_attributes
from pdserve.router.plan import annotate_route, choose
from pdserve.router.prompt import GenerateInput, PromptEncoder
from pdserve.router.recovery import WorkerFailedError, failure
from pdserve.router.relay import Event, final, relay, sent
from pdserve.router.request_ids import check_request_id
from pdserve.router.worker_pool import WorkerPool
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import prefill_pb2 as ppb

log = logging.getLogger(__name__)
_spans = tracing.Spans("router", service="router")
_LEASE_MARGIN_S = 10.0  # a decode reservation outlives the Prefill call by this: time to send Decode


class Router:
    def __init__(
        self,
        tokenizer,
        pool: WorkerPool,
        *,
        mode: str,
        max_model_len: int,
        max_inflight: int = 256,
        rpc_timeout_s: float = 600.0,
        local_prefill: str = "auto",
        prefill_timeout_s: float = 120.0,
        max_retries: int = 2,
    ):
        self.tokenizer = tokenizer
        self.pool = pool
        self.mode = mode
        self.max_model_len = max_model_len
        self.max_inflight = max_inflight
        self.rpc_timeout_s = rpc_timeout_s
        self.prefill_timeout_s = prefill_timeout_s  # a prefill worker this slow is treated as failed
        self.max_retries = max_retries  # attempts after the first, per request
        self.recoveries: collections.Counter[str] = collections.Counter()  # failed attempts by phase
        self.local_prefill = local_prefill  # auto (cost model), always, never
        self.prompts = PromptEncoder(tokenizer, max_model_len)
        self._ids_in_flight: set[str] = set()  # the workers know a request by its id: one at a time
        self.index = policy.PrefixIndex()
        self._instance = secrets.token_hex(4)  # this router process, in the ids workers see
        self._requests_taken = itertools.count()
        self.hop_ms = 0.0  # measured extra latency of the disaggregated path
        self.decisions: collections.Counter[str] = collections.Counter()
        self.on_admitted: Callable[[int, int], None] = lambda prompt_tokens, max_tokens: None  # the role balancer

    async def tokenize(self, inp: GenerateInput) -> list[int]:
        return await self.prompts.encode(inp)

    def genai_attributes(self, inp: GenerateInput) -> dict[str, str]:
        """The request's OpenTelemetry GenAI attributes (operation, model), for its metrics and span."""
        return genai_attributes(self.pool, inp.model, chat=inp.messages is not None)

    def plan(self, ids: list[int], exclude: set[int] = frozenset()) -> Plan:
        """Where this context runs, avoiding workers that already failed it."""
        return choose(
            self.pool, self.index, ids, exclude, mode=self.mode, local_prefill=self.local_prefill, hop_ms=self.hop_ms
        )

    async def generate(self, inp: GenerateInput) -> AsyncIterator[Event]:
        t0 = time.perf_counter()
        # The request's span, current inside each step (so every downstream call
        # is its child) but not across yields, where the caller's code runs.
        span = _spans.start("router.generate")
        events = tracing.within(tracing.context_with(span), self._generate(inp, t0, span))
        try:
            async for ev in events:
                yield ev
        except BaseException as e:
            tracing.fail(span, e)
            raise
        finally:
            await events.aclose()  # now, not when the abandoned generator is collected
            span.end()

    async def _generate(self, inp: GenerateInput, t0: float, span: tracing.Span) -> AsyncIterator[Event]:
        # Admission first: a refused request costs nothing, not even its tokenization.
        if self.inflight >= self.max_inflight:
            raise CapacityExhaustedError(f"router at capacity ({self.max_inflight} requests in flight)")
        rid = check_request_id(inp.request_id, self._ids_in_flight) or uuid.uuid4().hex
        logs.bind_request(rid)  # this task's log lines from here on, a failure before any token included
        self._ids_in_flight.add(rid)
        try:
            ids = await self.tokenize(inp)
            # What can be generated: the window ends any request (the balancer simulates this many steps).
            self.on_admitted(len(ids), min(inp.params.max_tokens, self.max_model_len - len(ids)))
            progress = Progress(
                rid,
                ids,
                inp.params,
                IncrementalDetokenizer.of(self.tokenizer, ids, inp.params),
                t0,
                deadline=inp.deadline,
                attempt_base=f"{rid}.{self._instance}{next(self._requests_taken)}",
            )
            if span.is_recording():  # built only for a trace: off by default, and this is per request
                p = inp.params
                tracing.annotate(
                    span,
                    request_id=rid,
                    **self.genai_attributes(inp),
                    **{
                        "gen_ai.usage.input_tokens": len(ids),
                        "gen_ai.request.max_tokens": p.max_tokens,
                        "gen_ai.request.temperature": p.temperature,
                        "gen_ai.request.top_p": p.top_p,
                        "gen_ai.request.seed": p.seed,
                    },
                )
            while True:
                try:
                    plan = self.plan(progress.context, progress.excluded)
                except NotReadyError:
                    if not progress.failures:
                        raise
                    # Every worker has failed this request: the client hears the last failure's
                    # cause (RESOURCE_EXHAUSTED from full queues), not "no worker left".
                    raise self._gave_up(progress, progress.failures[-1]) from None
                if progress.failures:  # retried elsewhere: counted once there is somewhere (else: gave_up alone)
                    self.recoveries[progress.failures[-1].phase] += 1
                self.decisions["disaggregated" if plan.prefill else "local_prefill"] += 1
                annotate_route(span, plan, attempt=len(progress.failures) + 1)
                attempt = self._attempt(progress, plan)
                try:
                    async for ev in attempt:
                        if ev.finish_reason is not None and span.is_recording():
                            span.set_attributes(tracing.timing_attributes(ev.timing))
                            tracing.annotate(
                                span,
                                **{
                                    "gen_ai.usage.output_tokens": len(progress.generated),
                                    "gen_ai.response.finish_reasons": [ev.finish_reason.value],
                                },
                            )
                        yield ev
                    return
                except WorkerFailedError as f:
                    self._recovering(progress, f)
                finally:
                    # A client gone while we are at the yield above closes us with GeneratorExit,
                    # not CancelledError: the attempt's cleanup must run now, not when it is collected.
                    await attempt.aclose()
        except grpc.aio.AioRpcError as e:
            raise relayed_error(e) from None
        finally:
            self._ids_in_flight.discard(rid)

    @property
    def inflight(self) -> int:
        """Requests in flight: taken, not yet ended."""
        return len(self._ids_in_flight)

    def _recovering(self, progress: Progress, f: WorkerFailedError) -> None:
        """Count a failed attempt; raise once the request's budget is spent."""
        progress.failures.append(f)
        work = "prefill" if f.phase == Phase.PREFILL.value else "decode"
        if f.cause is not None and f.cause.code() is grpc.StatusCode.UNAVAILABLE and not f.worker.has_left(work):
            f.worker.healthy = False  # until the load poll reaches it again
        if len(progress.failures) > self.max_retries:
            raise self._gave_up(progress, f) from None
        log.warning(
            "request %s: %s; retrying elsewhere (%d tokens already sent)",
            progress.request_id,
            f,
            len(progress.generated),
        )

    def _gave_up(self, progress: Progress, f: WorkerFailedError) -> Exception:
        self.recoveries["gave_up"] += 1
        err = relayed_error(f.cause) if f.cause is not None else NotReadyError(str(f))
        if isinstance(err, NotFoundError):  # a reservation gone: the client may well try again
            err = NotReadyError(str(err))
        return type(err)(f"request {progress.request_id} failed after {len(progress.failures)} attempts; last: {f}")

    async def _attempt(self, progress: Progress, plan: Plan) -> AsyncIterator[Event]:
        """One try on one plan: events for tokens the client has not had yet.
        A worker's failure raises WorkerFailedError; cleanup is complete either way."""
        decode = plan.decode.worker
        a = Attempt(plan, progress.attempt_id, progress.context, convert.sampling_to_pb(progress.remaining_params))
        decode.inflight += 1
        decode.arrivals.add()
        a.queued()
        try:
            if plan.prefill is None:
                a.generating(
                    decode.decode_stub.Generate(
                        dpb.LocalGenerateRequest(request_id=a.rid, prompt_token_ids=a.context, sampling=a.params),
                        timeout=progress.time_left(None),  # a stream: as long as the client allows
                    )
                )
            else:
                prefilled = await self._prefill_remotely(progress, a)
                ev, reason = sent(progress, [prefilled.first_token_id], convert.finish_from_pb(prefilled.finish_reason))
                if reason is not None:
                    yield final(progress, reason, plan, ev)
                    return
                yield ev
                # Still ours to release until the stream answers: a cancel now may
                # reach the worker before the call does, or the call never at all.
                a.decoding(
                    decode.decode_stub.Decode(
                        dpb.DecodeRequest(request_id=a.rid, first_token_id=prefilled.first_token_id, sampling=a.params),
                        timeout=progress.time_left(None),  # a stream: as long as the client allows
                    )
                )
            self.index.record(decode.worker_id, plan.hashes, self.pool.worker_ids())
            async for ev in relay(progress, a):
                yield ev
        except grpc.aio.AioRpcError as e:
            raise failure(a.blame(e), a.phase.value, e, progress.deadline_passed) from None
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the request's own cancel
                raise
            # Our call cancelled, not us: its channel was closed under it (a registered worker dropped as
            # silent): the worker's failure, retried elsewhere.
            raise WorkerFailedError(a.culprit, a.phase.value, None, "its channel was closed") from None
        finally:
            a.computed()
            if a.stream is not None:
                a.stream.cancel()  # no-op once finished; else cancels downstream
            try:
                if a.reserved:
                    try:  # shielded: a second cancel of this request must not call it off
                        release = decode.decode_stub.Release(dpb.ReleaseRequest(request_id=a.rid), timeout=5)
                        await asyncio.shield(release)
                    except (grpc.aio.AioRpcError, grpc.aio.UsageError):  # UsageError: its channel closed
                        pass  # the lease expires on its own
            finally:
                decode.inflight -= 1  # after the Release: a worker leaving discovery keeps its channel till then

    async def _prefill_remotely(self, progress: Progress, a: Attempt) -> ppb.PrefillResponse:
        """Reserve blocks on the decode worker, then prefill into them: the first token."""
        decode, prefill = a.plan.decode.worker, a.plan.prefill.worker
        prefill.inflight += 1
        try:
            a.reserving()
            # The lease covers the Prefill call below, queueing included: the router
            # releases on every path, so the lease matters only if the router is gone.
            prefill_s = progress.time_left(self.prefill_timeout_s)
            r = await decode.decode_stub.Reserve(
                dpb.ReserveRequest(
                    request_id=a.rid,
                    prompt_token_ids=a.context,
                    kv_fingerprint=prefill.fingerprint,
                    lease_ms=int((prefill_s + _LEASE_MARGIN_S) * 1000),
                ),
                timeout=progress.time_left(self.rpc_timeout_s),
            )
            a.prefilling()
            p = await prefill.prefill_stub.Prefill(
                ppb.PrefillRequest(request_id=a.rid, prompt_token_ids=a.context, sampling=a.params, ticket=r.ticket),
                timeout=prefill_s,
            )
        finally:
            prefill.inflight -= 1
            a.computed()
        self._measure_hop(progress, p.timing.prefill_ms)
        progress.timing.setdefault("queued_ms", p.timing.queued_ms)
        progress.timing.setdefault("prefill_ms", p.timing.prefill_ms)
        self.index.record(prefill.worker_id, a.plan.hashes, self.pool.worker_ids())
        if not progress.failures:  # a retry's context holds generated tokens too: no prompt's cache
            progress.cached_tokens = max(progress.cached_tokens, r.num_cached_tokens, p.num_cached_tokens)
        return p

    def _measure_hop(self, progress: Progress, prefill_ms: float) -> None:
        """The disaggregated path's extra latency over the prefill itself (first attempts only)."""
        now = time.perf_counter()
        if progress.t_first is None and not progress.failures:
            hop = max(0.0, (now - progress.t0) * 1e3 - prefill_ms)
            self.hop_ms = 0.8 * self.hop_ms + 0.2 * hop if self.hop_ms else hop
