"""The decode worker: reservations (leases), KV arrival, continuous-batch decoding."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from pdserve.common import tracing
from pdserve.common.admission import Admission
from pdserve.common.engine.async_engine import AsyncEngine
from pdserve.common.engine.outputs import RequestOutput
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import NotFoundError, TransferFailedError, TransferTimeoutError, TransferUnfencedError
from pdserve.common.kv.hashing import block_hashes
from pdserve.common.kv.prefix_reuse import admit_from_store, offer_to_store
from pdserve.common.kv.store_client import StoreClient
from pdserve.common.leases import Leases
from pdserve.common.transfer.base import KVReceiver, TransferTicket

log = logging.getLogger(__name__)
MAX_LEASE_S = 900.0  # whatever a caller asks, blocks never sit reserved longer
_spans = tracing.Spans("decode", service="decode")


@dataclass(frozen=True)
class Reservation:
    ticket: TransferTicket
    dest_block_ids: list[int]
    first_block_index: int  # leading prompt blocks already cached here
    num_cached_tokens: int
    expires_at: float  # unix time: the lease


@dataclass
class DecodeCounters:
    requests_completed: int = 0
    requests_aborted: int = 0
    tokens_generated: int = 0
    transfers_completed: int = 0
    transfers_failed: int = 0
    transfers_timed_out: int = 0
    kv_bytes_received: int = 0


class DecodeWorker:
    """One disaggregated request: `reserve()` takes blocks for the prompt (less what the
    prefix cache holds) and a ticket for the prefill worker, under a lease; `decode()` waits
    for the KV to land and verify, joins the running batch and streams tokens 2..N. Any
    failure, cancel or expiry frees the blocks. `generate()` is the colocated path."""

    def __init__(
        self,
        engine: AsyncEngine,
        receiver: KVReceiver,
        *,
        lease_s: float = 30.0,
        transfer_timeout_s: float = 30.0,
        max_queue: int = 256,
        store: StoreClient | None = None,
        worker_id: str = "",
        gate: Callable[[], None] = lambda: None,
    ):
        self.engine = engine
        self.active = 0  # reserve, decode and generate calls in progress
        self.worker_id = worker_id  # on its trace spans
        self.receiver = receiver
        # Loads cached prefixes (the prefill worker then sends less; a local prefill
        # computes less), and offers back what it prefilled itself.
        self.store = store
        self.lease_s = lease_s
        self.transfer_timeout_s = transfer_timeout_s
        # gate: raises while this worker takes no new decode work (an elastic worker in another role)
        self.admission = Admission(engine, max_queue, "decode", gate)
        self.counters = DecodeCounters()
        self._leases: Leases[Reservation] = Leases(self.release, "decode reservation")
        # Ids a Release came for before their reservation existed (it may overtake its
        # Reserve: the router releases as soon as the caller is gone), oldest first.
        self._released_early: dict[str, float] = {}
        self._offering: set[asyncio.Task] = set()  # finished local requests' blocks, going to the store

    @property
    def spec(self):
        return self.engine.spec

    async def start(self) -> None:
        self._leases.start()

    async def aclose(self) -> None:
        self._leases.stop()
        for rid in self._leases:
            await self.release(rid)
        if self._offering:  # blocks still going to the store: let them land, then free them
            await asyncio.gather(*self._offering, return_exceptions=True)

    def idle(self) -> bool:
        """No call in progress and no reservation waiting for its Decode call."""
        return not self.active and not len(self._leases)

    async def reserve(self, request_id: str, prompt: list[int], fingerprint: bytes, lease_ms: int = 0) -> Reservation:
        self.active += 1
        try:
            return await self._traced_reserve(request_id, prompt, fingerprint, lease_ms)
        finally:
            self.active -= 1

    async def _traced_reserve(
        self, request_id: str, prompt: list[int], fingerprint: bytes, lease_ms: int
    ) -> Reservation:
        with _spans.span(
            "decode.reserve", request_id=request_id, worker_id=self.worker_id, prompt_tokens=len(prompt)
        ) as span:
            r = await self._reserve(request_id, prompt, fingerprint, lease_ms)
            tracing.annotate(span, cached_blocks=r.first_block_index, reserved_blocks=len(r.dest_block_ids))
            return r

    async def _reserve(self, request_id: str, prompt: list[int], fingerprint: bytes, lease_ms: int) -> Reservation:
        self.spec.require_peer(fingerprint, "kv_fingerprint", "sender")
        seq = await self.engine.call(self.admission.reserve, request_id, prompt)
        bs, pool = self.spec.block_size, self.engine.pool
        try:
            first = await self._load_from_store(prompt, seq.block_table, seq.num_cached_tokens // bs)
            dest = seq.block_table[first:]
            ticket = self.receiver.expect(request_id, [pool.block(b) for b in dest])
        except TransferUnfencedError as e:  # the store's bytes may still land: its blocks wait for the fence
            await asyncio.shield(self.engine.quarantine(request_id, e.fenced))
            raise
        except BaseException:
            await asyncio.shield(self.engine.release(request_id))
            raise
        ttl = min(lease_ms / 1000, MAX_LEASE_S) if lease_ms else self.lease_s
        r = Reservation(ticket, dest, first, first * bs, time.time() + ttl)
        self._leases.add(request_id, r, ttl)
        if self._released_early.pop(request_id, None) is not None:  # freed now, not at its lease
            await self.release(request_id)
            raise NotFoundError(f"reservation {request_id!r} was released before it was made")
        return r

    async def _load_from_store(self, prompt: list[int], table: list[int], have: int) -> int:
        """Leading blocks now here: the local prefix cache's, then the store's."""
        if self.store is None:
            return have
        bs, pool = self.spec.block_size, self.engine.pool
        hashes = block_hashes(self.spec.fingerprint, prompt[: (len(prompt) - 1) // bs * bs], bs)
        return await self.store.load_prefix(hashes, [pool.block(b) for b in table[: len(hashes)]], have)

    async def decode(
        self,
        request_id: str,
        first_token: int,
        params: SamplingParams,
        on_kv: Callable[[float], None] = lambda ms: None,
    ) -> AsyncIterator[RequestOutput]:
        """Tokens 2..N of a reserved request, once its KV has arrived intact;
        on_kv gets how long decode waited for the KV (the transfer's unoverlapped tail)."""
        self.active += 1
        try:
            async for out in self._decode(request_id, first_token, params, on_kv):
                yield out
        finally:
            self.active -= 1

    async def _decode(
        self, request_id: str, first_token: int, params: SamplingParams, on_kv: Callable[[float], None]
    ) -> AsyncIterator[RequestOutput]:
        r = self._leases.claim(request_id)  # the transfer timeout bounds it from here
        if r is None:
            raise NotFoundError(f"no reservation {request_id!r} (expired or released)")
        t0 = time.perf_counter()
        try:  # until admitted, the lease names the blocks: any failure or cancel frees them
            await self.receiver.wait(request_id, self.transfer_timeout_s)
            on_kv((time.perf_counter() - t0) * 1e3)
            self.counters.transfers_completed += 1
            self.counters.kv_bytes_received += len(r.dest_block_ids) * r.ticket.block_bytes
            await self.receiver.cancel(request_id)  # forget the finished transfer
            await self.engine.admit(request_id, first_token, params)  # after the engine's running step
        except BaseException as e:
            if isinstance(e, TransferTimeoutError):
                self.counters.transfers_timed_out += 1
            elif isinstance(e, TransferFailedError):
                self.counters.transfers_failed += 1
            await self.release(request_id)
            raise
        self._leases.pop(request_id)  # admitted: the engine's request owns them now
        async for out in self._counted(request_id, "decode", self.engine.stream(request_id)):
            yield out

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Colocated (or routed to prefill here): prefill and decode here, from whatever
        prefix the KV store holds; with a writable store, the computed context (prompt
        and reply) is offered back when the request ends, for the conversation's next turn."""
        self.active += 1
        try:
            async for out in self._generate(request_id, prompt, params):
                yield out
        finally:
            self.active -= 1

    async def _generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        from_store = 0
        if self.store is None:
            await self.engine.add(prompt, params, request_id, admission=self.admission.check)
        else:
            from_store = await admit_from_store(
                self.engine, self.store, request_id, prompt, params, self.admission.reserve, hold_blocks=True
            )
        generated: list[int] = []
        outputs = self._counted(request_id, "generate", self.engine.stream(request_id))
        try:
            async for out in outputs:
                generated += out.new_token_ids
                if out.finished and from_store:  # usage counts the store's tokens as cached, as prefill does
                    out = dataclasses.replace(out, num_cached_tokens=out.num_cached_tokens + from_store)
                yield out
        finally:
            # Now, not at garbage collection: the engine's stream aborts an unfinished request
            # (under the engine's lock), so its blocks are held and final before they are offered.
            await outputs.aclose()
            if self.store is not None:  # in the background: the stream is answered; the blocks wait for the store
                task = asyncio.create_task(self._offer(request_id, prompt + generated))
                self._offering.add(task)
                task.add_done_callback(self._offering.discard)

    async def _offer(self, request_id: str, tokens: list[int]) -> None:
        try:
            await offer_to_store(self.engine, self.store, request_id, tokens)
        except Exception as e:  # the store is a cache: a failed offer costs a later recompute, no more
            log.warning("request %s: offering its KV to the store failed: %s", request_id, e)
        finally:
            await self.engine.release(request_id)

    async def _counted(
        self, request_id: str, phase: str, outputs: AsyncGenerator[RequestOutput, None]
    ) -> AsyncIterator[RequestOutput]:
        finished, tokens = False, 0
        # Started and ended here, never current: it lasts across yields.
        span = _spans.start(f"decode.{phase}", request_id=request_id, worker_id=self.worker_id)
        try:
            async for out in outputs:
                tokens += len(out.new_token_ids)
                self.counters.tokens_generated += len(out.new_token_ids)
                finished = out.finished
                yield out
        except BaseException as e:
            tracing.fail(span, e)
            raise
        finally:
            await outputs.aclose()  # the engine's stream aborts an unfinished request: now, not at GC
            tracing.annotate(span, tokens_generated=tokens, finished=finished)
            span.end()
            if finished:
                self.counters.requests_completed += 1
            else:
                self.counters.requests_aborted += 1

    async def release(self, request_id: str) -> bool:
        """Free a reservation (idempotent). A running request is aborted by
        cancelling its Decode stream instead. Once begun it runs to the end even if
        the caller is cancelled: half done, the lease is gone and the blocks with it."""
        return await asyncio.shield(self._release(request_id))

    async def _release(self, request_id: str) -> bool:
        r = self._leases.pop(request_id)
        if r is None:
            self._remember_early_release(request_id)
            return False
        safe = await self.receiver.cancel(request_id)
        if not safe:  # data might still land: no one gets these blocks until the transfer is fenced
            log.error("transfer %s could not be fenced; quarantining %d blocks", request_id, len(r.dest_block_ids))
            # No longer a reservation: admission stops counting it.
            await self.engine.quarantine(request_id, self.receiver.when_fenced(request_id))
            return True
        return await self.engine.release(request_id)

    def _remember_early_release(self, request_id: str) -> None:
        """Kept as long as any lease may last (attempt ids are never reused)."""
        now = time.monotonic()
        while self._released_early and now - next(iter(self._released_early.values())) > MAX_LEASE_S:
            del self._released_early[next(iter(self._released_early))]
        self._released_early[request_id] = now

    @property
    def reservations_expired(self) -> int:
        return self._leases.expired

    @property
    def active_reservations(self) -> int:
        return len(self._leases)
