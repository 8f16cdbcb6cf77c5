"""The prefill worker: computes prompts in chunks and pushes KV as it goes.

After every engine step the request's newly completed blocks are sent to
the decode worker's ticket while the next chunk computes (the scheduler side
decides which blocks and when; the transfer layer moves the bytes). The
first token is returned as soon as it is sampled; the request's blocks stay
held until every send has finished, then they are freed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

from pdserve.common.engine.async_engine import AsyncEngine
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.sequence import FinishReason
from pdserve.common.errors import CapacityExhaustedError
from pdserve.common.transfer.base import KVSender, TransferTicket

log = logging.getLogger(__name__)


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
        self.worker, self.request_id, self.target = worker, request_id, target
        self.next_block = target.first_block_index  # next sequence block to send
        self.tasks: list[asyncio.Task] = []
        self.bytes_sent = 0

    def send_ready(self, final: bool) -> None:
        engine = self.worker.engine.engine
        computed, table = engine.kv_blocks(self.request_id)
        bs = engine.config.block_size
        ready = (computed + bs - 1) // bs if final else computed // bs  # the last, partial block once done
        ready = min(ready, self.target.first_block_index + self.target.ticket.num_blocks)
        if ready <= self.next_block:
            return
        blocks = [engine.pool.block(b) for b in table[self.next_block : ready]]
        start = self.next_block - self.target.first_block_index
        self.tasks.append(asyncio.create_task(self.worker.sender.send(self.target.ticket, start, blocks)))
        self.bytes_sent += len(blocks) * self.target.ticket.block_bytes
        self.next_block = ready

    async def finish(self) -> None:
        """Wait for every send, then free the request's blocks."""
        try:
            await asyncio.gather(*self.tasks)
        except Exception as e:  # the decode side sees the failure and recomputes
            log.warning("KV push for %s failed: %s", self.request_id, e)
        finally:
            await self.worker.engine.call(self.worker.engine.engine.release, self.request_id)

    def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()


class PrefillWorker:
    def __init__(self, engine: AsyncEngine, sender: KVSender, *, max_queue: int = 256):
        self.engine = engine
        self.sender = sender
        self.max_queue = max_queue
        self._finishing: set[asyncio.Task] = set()
        self.kv_bytes_sent = 0

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams,
                      target: PushTarget | None) -> PrefillResult:
        if len(self.engine.engine.scheduler.waiting) >= self.max_queue:
            raise CapacityExhaustedError(f"prefill queue full ({self.max_queue} requests waiting)")
        arrived = time.perf_counter()
        await self.engine.add(prompt, dataclasses.replace(params, max_tokens=1), request_id, hold_blocks=True)
        push = _Push(self, request_id, target) if target else None
        if push:
            self.engine.watch(request_id, lambda: push.send_ready(final=False))
        out = None
        try:
            async for out in self.engine.stream(request_id):
                pass
            if push:
                push.send_ready(final=True)
        except BaseException:
            if push:
                push.cancel()
            raise
        finally:
            self.engine.unwatch(request_id)
            # Blocks are freed once every send is done (or at once without a target).
            task = asyncio.create_task(push.finish() if push else self._release(request_id))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
        now = time.perf_counter()
        token = out.new_token_ids[0]
        reason = out.finish_reason if (out.finish_reason is FinishReason.STOP or params.max_tokens == 1) else None
        if push:
            self.kv_bytes_sent += push.bytes_sent
        return PrefillResult(
            first_token=token, finish_reason=reason,
            num_computed_tokens=out.num_prompt_tokens - out.num_cached_tokens,
            num_cached_tokens=out.num_cached_tokens,
            queued_ms=out.queued_s * 1e3,
            prefill_ms=(now - arrived) * 1e3,
            kv_bytes_sent=push.bytes_sent if push else 0,
        )

    async def _release(self, request_id: str) -> None:
        await self.engine.call(self.engine.engine.release, request_id)

    async def drain(self) -> None:
        """Wait for in-flight pushes (on shutdown)."""
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
