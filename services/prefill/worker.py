"""The prefill worker: computes prompts in chunks, pushing each step's finished KV blocks
to the decode worker's ticket while the next chunk computes; the first token returns once
sampled, and the blocks are freed when every send has finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.common import tracing
from pdserve.common.admission import Admission
from pdserve.common.engine.async_engine import AsyncEngine
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.sequence import FinishReason
from pdserve.common.errors import NotFoundError
from pdserve.common.kv.prefix_reuse import admit_from_store, offer_to_store
from pdserve.common.kv.store_client import StoreClient
from pdserve.common.transfer.base import KVSender, TransferTicket

log = logging.getLogger(__name__)
_spans = tracing.Spans("prefill", service="prefill")


@dataclass(frozen=True)
class PushTarget:
    """Where the KV goes: the decode worker's ticket."""

    ticket: TransferTicket
    first_block_index: int  # leading blocks the receiver already has


@dataclass
class PrefillResult:
    first_token: int
    finish_reason: FinishReason | None  # set when the first token already ends the request
    num_computed_tokens: int
    num_cached_tokens: int
    queued_ms: float
    prefill_ms: float
    kv_bytes_sent: int


class _Push:
    """Sends one request's blocks in order, one send per engine step."""

    def __init__(self, worker: "PrefillWorker", request_id: str, target: PushTarget):
        self.worker = worker
        self.request_id = request_id
        self.target = target
        self.next_block = target.first_block_index  # next sequence block to send
        self.tasks: list[asyncio.Task] = []
        self.bytes_sent = 0

    def send_ready(self, final: bool, context: tracing.Context) -> None:
        """Send the blocks completed since the last call; `context`: the chunk's
        that completed them, whose child the send's span becomes."""
        engine = self.worker.engine
        computed, table = engine.kv_blocks(self.request_id)
        bs = engine.block_size
        ready = (computed + bs - 1) // bs if final else computed // bs  # the last, partial block once done
        ready = min(ready, self.target.first_block_index + self.target.ticket.num_blocks)
        if ready <= self.next_block:
            return
        blocks = [engine.pool.block(b) for b in table[self.next_block : ready]]
        start = self.next_block - self.target.first_block_index
        self.tasks.append(
            tracing.create_task(
                self.worker.sender.send(self.target.ticket, start, blocks, timeout=self.worker.transfer_timeout_s),
                context,
            )
        )
        self.bytes_sent += len(blocks) * self.target.ticket.block_bytes
        self.next_block = ready

    async def wait(self) -> None:
        """Wait for every send, failed or not: the blocks are freed after it, and a send still reading
        them would send the next prompt's KV. A failure is the decode side's to handle (it recomputes)."""
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        failed = [r for r in results if isinstance(r, Exception)]  # not a cancel: that is ours
        if failed:
            log.warning("KV push for %s failed: %s", self.request_id, failed[0])

    def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()


class _Chunks:
    """Trace spans of one prompt in the engine: the wait in its queue, then
    one span per chunk (the engine step that computed it). on_step runs in the
    engine loop, outside the request's context, so the spans take its parent
    from here explicitly."""

    def __init__(self, worker: "PrefillWorker", request_id: str):
        self.engine = worker.engine
        self.request_id = request_id
        self.worker_id = worker.worker_id
        self.parent = self.context = tracing.current_context()  # context: the latest chunk's
        self.queued_ns = time.time_ns()
        self.computed = worker.engine.kv_blocks(request_id)[0] if tracing.enabled() else 0
        self.count = 0

    def on_step(self) -> None:
        if not tracing.enabled():
            return
        try:
            computed = self.engine.kv_blocks(self.request_id)[0]
        except NotFoundError:  # aborted
            return
        if computed <= self.computed:  # not in this step (or preempted: it recomputes)
            self.computed = computed
            return
        start, end = self.engine.last_step_ns
        start = max(start, self.queued_ns)
        ids = {"request_id": self.request_id, "worker_id": self.worker_id}
        if self.count == 0:
            _spans.start("prefill.queue", context=self.parent, start_time=self.queued_ns, **ids).end(start)
        chunk = _spans.start(
            "prefill.chunk",
            context=self.parent,
            start_time=start,
            chunk=self.count,
            tokens=computed - self.computed,
            computed_tokens=computed,
            **ids,
        )
        chunk.end(end)
        self.context = tracing.context_with(chunk, self.parent)
        self.computed, self.count = computed, self.count + 1


class PrefillWorker:
    def __init__(
        self,
        engine: AsyncEngine,
        sender: KVSender,
        *,
        max_queue: int = 256,
        store: StoreClient | None = None,
        worker_id: str = "",
        transfer_timeout_s: float = 30.0,
        gate: Callable[[], None] = lambda: None,
    ):
        self.engine = engine
        self.active = 0  # prefill calls in progress
        self.transfer_timeout_s = transfer_timeout_s  # blocks stay held this long for a receiver that never takes them
        self.worker_id = worker_id  # on its trace spans
        self.sender = sender
        self.store = store
        # gate: raises while this worker takes no new prefills (an elastic worker in another role)
        self.admission = Admission(engine, max_queue, "prefill", gate)
        self._finishing: set[asyncio.Task] = set()
        self.kv_bytes_sent = 0

    async def _admit(self, request_id: str, prompt: list[int], params: SamplingParams) -> int:
        """Queue the prompt, after loading what the KV store has beyond the local
        prefix cache; returns the prompt tokens loaded from the store."""
        if self.store is None:
            await self.engine.add(prompt, params, request_id, hold_blocks=True, admission=self.admission.check)
            return 0
        return await admit_from_store(
            self.engine, self.store, request_id, prompt, params, self.admission.reserve, hold_blocks=True
        )

    def idle(self) -> bool:
        """No prefill in progress and no KV push still going."""
        return not self.active and not self._finishing

    async def prefill(
        self, request_id: str, prompt: list[int], params: SamplingParams, target: PushTarget | None
    ) -> PrefillResult:
        self.active += 1
        try:
            return await self._prefill(request_id, prompt, params, target)
        finally:
            self.active -= 1

    async def _prefill(
        self, request_id: str, prompt: list[int], params: SamplingParams, target: PushTarget | None
    ) -> PrefillResult:
        arrived = time.perf_counter()
        with _spans.span(
            "prefill.admit", request_id=request_id, worker_id=self.worker_id, prompt_tokens=len(prompt)
        ) as span:
            from_store = await self._admit(request_id, prompt, dataclasses.replace(params, max_tokens=1))
            tracing.annotate(span, store_tokens=from_store)
        push = _Push(self, request_id, target) if target else None
        chunks = _Chunks(self, request_id)

        def on_step() -> None:
            chunks.on_step()
            if push:
                push.send_ready(final=False, context=chunks.context)

        self.engine.watch(request_id, on_step)
        out = None
        try:
            async for out in self.engine.stream(request_id):
                pass
            if push:
                push.send_ready(final=True, context=chunks.context)
        except BaseException:
            if push:
                push.cancel()
            raise
        finally:
            self.engine.unwatch(request_id)
            # Blocks are freed once every send (to decode, to the store) is done.
            task = asyncio.create_task(self._finish(request_id, prompt, push, offer=out is not None))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
        now = time.perf_counter()
        token = out.new_token_ids[0]
        # The engine ran with max_tokens=1, so its LENGTH is ours only if the client asked for one token
        # or the first one filled the context window (decode would sample one past it).
        full = out.num_prompt_tokens + 1 >= self.engine.max_model_len
        reason = (
            out.finish_reason if (out.finish_reason is FinishReason.STOP or params.max_tokens == 1 or full) else None
        )
        if push:
            self.kv_bytes_sent += push.bytes_sent
        cached = out.num_cached_tokens + from_store
        tracing.annotate(cached_tokens=cached, chunks=chunks.count, kv_bytes_sent=push.bytes_sent if push else 0)
        return PrefillResult(
            first_token=token,
            finish_reason=reason,
            num_computed_tokens=out.num_prompt_tokens - cached,
            num_cached_tokens=cached,
            queued_ms=out.queued_s * 1e3,
            prefill_ms=(now - arrived) * 1e3,
            kv_bytes_sent=push.bytes_sent if push else 0,
        )

    async def _finish(self, request_id: str, prompt: list[int], push: _Push | None, offer: bool) -> None:
        try:
            jobs = [push.wait()] if push else []
            if self.store is not None and offer:
                jobs.append(offer_to_store(self.engine, self.store, request_id, prompt))
            await asyncio.gather(*jobs)
        finally:  # shielded: a cancel (a stop) must not leave the blocks held
            await asyncio.shield(self.engine.release(request_id))

    async def aclose(self) -> None:
        """Wait for in-flight pushes (on shutdown)."""
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
