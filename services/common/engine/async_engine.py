"""The engine inside an asyncio service: one step loop, many request streams.

`LLMEngine` is single-threaded. Here one task owns it: it runs `step()` in a
worker thread (torch releases the GIL, so gRPC keeps serving) and hands each
output to its request's queue. Everything else that touches the engine
(add, abort, reserve, admit, release, stats) goes through `call()`, which
takes the same lock the loop holds during a step, so state only changes
between steps. After every step, watchers are called (the prefill worker
sends newly computed KV blocks from there while the next step computes).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.outputs import RequestOutput
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import NotFoundError

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = asyncio.Lock()
        self._work = asyncio.Event()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._watchers: dict[str, Callable[[], None]] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._task: asyncio.Task | None = None
        self.step_ms_ewma = 0.0  # measured step time, reported in worker load
        self.prefill_tps_ewma = 0.0  # measured prefill tokens/s
        self.last_step_ns = (0, 0)  # wall-clock start and end of the latest step (trace spans)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(engine state) between steps."""
        async with self._lock:
            result = fn(*args, **kwargs)
        self._work.set()
        return result

    def watch(self, request_id: str, callback: Callable[[], None]) -> None:
        """Call `callback` after every step until unwatch (on the event loop)."""
        self._watchers[request_id] = callback

    def unwatch(self, request_id: str) -> None:
        self._watchers.pop(request_id, None)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_unfinished():
                self._work.clear()
                await self._work.wait()
                continue
            async with self._lock:
                try:
                    outputs = await loop.run_in_executor(self._executor, self._timed_step)
                except Exception as e:  # a broken step fails its requests, not the server
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
            for cb in list(self._watchers.values()):
                cb()
            await asyncio.sleep(0)  # let waiting callers take the lock between steps

    def _timed_step(self) -> list[RequestOutput]:
        before = self.engine.computed_tokens
        t, start_ns = time.perf_counter(), time.time_ns()
        outputs = self.engine.step()
        self.last_step_ns = (start_ns, time.time_ns())
        self._observe(self.engine.computed_tokens - before, time.perf_counter() - t)
        return outputs

    def _observe(self, tokens: int, seconds: float) -> None:
        """Moving averages the router's cost model reads from the worker's load:
        the time of a decode-sized step, and prefill tokens/s of large steps."""
        if tokens <= 32:
            ms = seconds * 1e3
            self.step_ms_ewma = 0.9 * self.step_ms_ewma + 0.1 * ms if self.step_ms_ewma else ms
        else:
            tps = tokens / seconds
            self.prefill_tps_ewma = 0.8 * self.prefill_tps_ewma + 0.2 * tps if self.prefill_tps_ewma else tps

    def warm_up(self, tokens: int = 256, rounds: int = 3) -> None:
        """Run short and long prompts before serving: the first round pays first-call
        costs; the best of the later rounds seeds the cost model (the best, since
        a busy neighbour only ever makes a measurement slower)."""
        from pdserve.common.engine.sampling_params import SamplingParams

        vocab = self.engine.model.config.vocab_size
        best = {1: float("inf"), tokens: float("inf")}
        for r in range(rounds + 1):
            for n in best:
                prompt = [(100 + 31 * i + 7 * r) % vocab for i in range(n)]
                self.engine.add_request(prompt, SamplingParams(max_tokens=1), request_id=f"warm-up-{n}-{time.time_ns()}")
                t = time.perf_counter()
                while self.engine.has_unfinished():
                    self.engine.step()
                if r:
                    best[n] = min(best[n], time.perf_counter() - t)
        self.step_ms_ewma = best[1] * 1e3
        self.prefill_tps_ewma = tokens / best[tokens]

    def _fail_all(self, error: BaseException) -> None:
        for rid, q in list(self._queues.items()):
            q.put_nowait(error)
            try:
                self.engine.abort(rid)
            except NotFoundError:
                pass

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of a request already added (or admitted); aborts it if the consumer leaves."""
        q = self._queues[request_id]
        finished = False
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self.call(self._abort_quietly, request_id)

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except NotFoundError:
            pass

    async def add(self, prompt: list[int], params: SamplingParams, request_id: str, hold_blocks: bool = False,
                  admission: Callable[[], None] | None = None) -> None:
        """Queue a request; `admission` (e.g. a bounded queue's check) runs under
        the same lock, so a burst of callers cannot all pass it before any is queued."""
        async with self._lock:
            if admission is not None:
                admission()
            self.engine.add_request(prompt, params, request_id=request_id, hold_blocks=hold_blocks)
            self._queues[request_id] = asyncio.Queue()
        self._work.set()

    async def admit(self, request_id: str, first_token: int, params: SamplingParams) -> None:
        await self.resume(request_id, None, params, first_token)

    async def resume(self, request_id: str, computed_tokens: int | None, params: SamplingParams,
                     first_token: int | None = None, hold_blocks: bool = False) -> None:
        """Schedule a reservation (see LLMEngine.resume); None: the whole prompt is here."""
        async with self._lock:
            if computed_tokens is None:
                self.engine.admit(request_id, first_token, params)
            else:
                self.engine.resume(request_id, computed_tokens, params, first_token, hold_blocks)
            self._queues[request_id] = asyncio.Queue()
        self._work.set()
