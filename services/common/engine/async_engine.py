"""The engine inside an asyncio service: one task steps it in a thread (torch releases
the GIL), every other touch goes through `call()` under the same lock, so state only
changes between steps; watchers run after each step. Why: docs/engine.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pdserve.common import affinity
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.outputs import EngineStats, RequestOutput
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.sequence import Sequence
from pdserve.common.errors import NotFoundError
from pdserve.common.kv.pool import KVPool
from pdserve.common.kv.spec import KVSpec
from pdserve.common.transfer.fence import Reclaims

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_WAIT_S = 0.05  # after a step that could run nothing: the longest wait before trying again


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], cpus: list[int] | None = None):
        """engine: an engine, or what builds one (on the step thread: see on_step_thread).
        cpus: the cores the step thread (and the torch threads it starts) runs on; None: any."""
        self._lock = asyncio.Lock()
        self._work = asyncio.Event()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._watchers: dict[str, Callable[[], None]] = {}
        self.cpus = cpus or []
        pin = {"initializer": affinity.pin_thread, "initargs": (cpus,)} if cpus else {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-step", **pin)
        self.engine = engine if isinstance(engine, LLMEngine) else self.on_step_thread(engine)
        self._task: asyncio.Task | None = None
        self._reclaims = Reclaims()
        self.step_ms_ewma = 0.0  # measured step time, reported in worker load
        self.prefill_tps_ewma = 0.0  # measured prefill tokens/s
        self.last_step_ns = (0, 0)  # wall-clock start and end of the latest step (trace spans)

    # What workers read of the engine, without reaching through: its layout and pool,
    # counters (safe at any time), and the calls admission checks make under the lock.
    @property
    def spec(self) -> KVSpec:
        return self.engine.spec

    @property
    def pool(self) -> KVPool:
        return self.engine.pool

    @property
    def max_model_len(self) -> int:
        """The longest context a sequence may reach here (tokens)."""
        return self.engine.max_model_len

    @property
    def block_size(self) -> int:
        return self.engine.config.block_size

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def computed_tokens(self) -> int:
        """Tokens computed since start (prompt and decode), a counter."""
        return self.engine.computed_tokens

    def waiting_tokens(self) -> int:
        """Prompt tokens queued and not yet computed."""
        return sum(s.num_tokens - s.num_computed_tokens for s in self.engine.scheduler.waiting)

    def describe(self) -> str:
        where = f", steps on core{'s' * (len(self.cpus) > 1)} {','.join(map(str, self.cpus))}" if self.cpus else ""
        return self.engine.describe() + where

    def kv_blocks(self, request_id: str) -> tuple[int, list[int]]:
        """(computed tokens, block table) of a request."""
        return self.engine.kv_blocks(request_id)

    def reserve(self, request_id: str, prompt: list[int]) -> Sequence:
        """Blocks for a prompt, not yet scheduled; call it under the lock (inside `call`)."""
        return self.engine.reserve(request_id, prompt)

    async def release(self, request_id: str) -> bool:
        """Free a request's blocks (a reservation or a held request), between steps."""
        return await self.call(self.engine.release, request_id)

    async def quarantine(self, request_id: str, fenced: Awaitable[None] | None = None) -> None:
        """Engine.quarantine, between steps; its blocks come back once `fenced` is done (KVReceiver.when_fenced)."""
        await self.call(self.engine.quarantine, request_id)
        if fenced is not None:
            self._reclaims.after(fenced, lambda: self.call(self.engine.reclaim, request_id), request_id)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        self._reclaims.cancel()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def on_step_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the step thread, waited for; not while the loop runs. torch's parallel work
        belongs on one thread: OpenMP gives each thread that starts it a team of its own, and with
        more team threads than cores libgomp puts them to sleep after every region. A decode step
        took 12 ms on the step thread of an engine built on another one, against 6.7 (docs/engine.md)."""
        return self._executor.submit(fn, *args).result()

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
                    outputs, ran = await loop.run_in_executor(self._executor, self._timed_step)
                except Exception as e:  # a broken step fails its requests, not the server
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                if not ran:  # requests wait for blocks others hold (pushes, reservations): no spinning
                    self._work.clear()
            if not ran:
                with contextlib.suppress(TimeoutError):  # a release comes through call(), which wakes us
                    await asyncio.wait_for(self._work.wait(), _IDLE_WAIT_S)
                continue
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
            for cb in list(self._watchers.values()):
                try:
                    cb()
                except Exception:  # one request's bug: the loop every stream waits on goes on
                    log.exception("step watcher failed")
            await asyncio.sleep(0)  # let waiting callers take the lock between steps

    def _timed_step(self) -> tuple[list[RequestOutput], bool]:
        """A step's outputs, and whether it computed anything (an empty step is no measurement)."""
        before = self.engine.computed_tokens
        t, start_ns = time.perf_counter(), time.time_ns()
        outputs = self.engine.step()
        tokens = self.engine.computed_tokens - before
        if tokens:
            self.last_step_ns = (start_ns, time.time_ns())
            self._observe(tokens, time.perf_counter() - t)
        return outputs, bool(tokens or outputs)

    def _observe(self, tokens: int, seconds: float) -> None:
        """Moving averages the router's cost model reads from the worker's load:
        the time of a decode-sized step, and prefill tokens/s of large steps."""
        if tokens <= 32:
            ms = seconds * 1e3
            self.step_ms_ewma = 0.9 * self.step_ms_ewma + 0.1 * ms if self.step_ms_ewma else ms
        else:
            tps = tokens / seconds
            self.prefill_tps_ewma = 0.8 * self.prefill_tps_ewma + 0.2 * tps if self.prefill_tps_ewma else tps

    def warm_up(self, tokens: int = 128, rounds: int = 2) -> None:
        """Run short and long prompts before serving, on the step thread: the first round
        pays first-call costs; the best of the later rounds seeds the cost model (the best,
        since a busy neighbour only ever makes a measurement slower). Then the weights go into
        huge pages, off the start path (weight_arena). Small: it is on a restarted worker's way
        back (docs/reliability.md, "Supervision")."""
        self.on_step_thread(self._warm_up, tokens, rounds)
        self.engine.runner.weights_to_huge_pages()

    def _warm_up(self, tokens: int, rounds: int) -> None:
        vocab = self.engine.model.config.vocab_size
        best = {1: float("inf"), tokens: float("inf")}
        for r in range(rounds + 1):
            for n in best:
                prompt = [(100 + 31 * i + 7 * r) % vocab for i in range(n)]
                self.engine.add_request(
                    prompt, SamplingParams(max_tokens=1), request_id=f"warm-up-{n}-{time.time_ns()}"
                )
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
            if not finished:  # shielded: a second cancel must not leave the request running with no reader
                await asyncio.shield(self.call(self._abort_quietly, request_id))

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except NotFoundError:
            pass

    async def add(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str,
        hold_blocks: bool = False,
        admission: Callable[[], None] | None = None,
    ) -> None:
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

    async def resume(
        self,
        request_id: str,
        computed_tokens: int | None,
        params: SamplingParams,
        first_token: int | None = None,
        hold_blocks: bool = False,
    ) -> None:
        """Schedule a reservation (see LLMEngine.resume); None: the whole prompt is here."""
        async with self._lock:
            if computed_tokens is None:
                self.engine.admit(request_id, first_token, params)
            else:
                self.engine.resume(request_id, computed_tokens, params, first_token, hold_blocks)
            self._queues[request_id] = asyncio.Queue()
        self._work.set()
