"""A worker's client of the KV store: load a cached prefix, offer new blocks.

Best effort by design: the store is a cache. If it is down, slow or evicts
mid-read, the worker computes instead, and says so in the log; a request
never fails because of the store. One that stops answering (a call timed out)
is left alone for a while, so requests do not each wait out its timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from pdserve.common import grpc_tracing, tracing
from pdserve.common.errors import TransferTimeoutError, TransferUnfencedError
from pdserve.common.security import OPEN, SecurityConfig
from pdserve.common.transfer.base import KVReceiver, KVSender, TransferTicket
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import kvstore_pb2 as kpb
from pdserve.v1 import kvstore_pb2_grpc

log = logging.getLogger(__name__)
_spans = tracing.Spans("store_client")
PAUSE_S = (1.0, 30.0)  # after a call timed out, the store is left alone this long, doubling to the most


def _timed_out(e: Exception) -> bool:
    """A store that did not answer in time (frozen, cut off): unlike a refused connection, each
    request that asks it waits out the timeout."""
    code = e.code() if isinstance(e, grpc.aio.AioRpcError) else None
    return isinstance(e, TransferTimeoutError) or code is grpc.StatusCode.DEADLINE_EXCEEDED


class StoreClient:
    def __init__(
        self,
        target: str,
        receiver: KVReceiver,
        sender: KVSender,
        fingerprint: bytes,
        timeout_s: float = 10.0,
        security: SecurityConfig = OPEN,
    ):
        self.target = target
        self.receiver = receiver
        self.sender = sender
        self.fingerprint = fingerprint
        self.timeout_s = timeout_s
        self._channel = security.dial(target, interceptors=grpc_tracing.client_interceptors())
        self.stub = kvstore_pb2_grpc.KVStoreStub(self._channel)
        self.loaded_blocks = 0
        self.stored_blocks = 0
        self.paused_until = 0.0  # time.monotonic() before which requests do without the store
        self._pause_s = 0.0
        self._releasing: set[asyncio.Task] = set()  # abandoned reads' Release calls, kept till done

    def _available(self) -> bool:
        return time.monotonic() >= self.paused_until

    def _answered(self) -> None:
        self._pause_s = 0.0

    def _failed(self, e: Exception, what: str) -> None:
        if not _timed_out(e):
            log.warning("KV store %s: %s: %s", self.target, what, e)
            return
        self._pause_s = min(PAUSE_S[1], max(PAUSE_S[0], 2 * self._pause_s))
        self.paused_until = time.monotonic() + self._pause_s
        log.warning("KV store %s: %s: %s; left alone for %gs", self.target, what, e, self._pause_s)

    def _mismatched(self, theirs: int, mine: int) -> None:
        """Said once, then the store is left alone for good: every write would fail the same way."""
        self.paused_until = float("inf")
        log.error(
            "KV store %s holds blocks of %d bytes, this worker's are %d: start it with the workers' --model, "
            "--dtype and --block-size (its `auto` dtype resolves on its own CPU); going on without it",
            self.target,
            theirs,
            mine,
        )

    async def aclose(self) -> None:
        await self._channel.close()

    async def load_prefix(self, hashes: list[bytes], dest: list, have: int) -> int:
        """Fill dest[have:n] with the store's blocks; returns n (>= have).

        `hashes` are the prompt's full-block hashes, `dest` the pool blocks of
        the same positions, `have` how many leading blocks are already here.
        """
        if not self._available():
            return have
        with _spans.span("kvstore.load", blocks_requested=len(hashes), blocks_present=have) as span:
            n = await self._load_prefix(hashes, dest, have)
            tracing.annotate(span, blocks_loaded=n - have)
            return n

    async def _load_prefix(self, hashes: list[bytes], dest: list, have: int) -> int:
        tid, leased = None, ""  # leased: a read the store is pushing, not yet landed here
        try:
            found = (
                await self.stub.Lookup(
                    kpb.LookupRequest(kv_fingerprint=self.fingerprint, block_hashes=hashes), timeout=self.timeout_s
                )
            ).num_cached_blocks
            self._answered()
            if found <= have:
                return have
            tid = "r-" + uuid.uuid4().hex
            t = self.receiver.expect(tid, dest[have:found])
            ticket = pb.TransferTicket(
                transfer_id=tid,
                secret=t.secret,
                ucx_address=t.address,
                block_bytes=t.block_bytes,
                num_blocks=t.num_blocks,
                first_block_index=have,
            )
            r = await self.stub.ReserveRead(
                kpb.ReserveReadRequest(kv_fingerprint=self.fingerprint, block_hashes=hashes[:found], ticket=ticket),
                timeout=self.timeout_s,
            )
            if r.num_blocks == 0:  # evicted since the lookup
                return have
            leased = r.lease_id
            await self.receiver.wait(tid, self.timeout_s)
            leased = ""
            self.loaded_blocks += found - have
            return found
        except Exception as e:  # noqa: BLE001 - the store is optional: compute instead
            tracing.fail(tracing.current_span(), e)
            self._failed(e, "prefix load failed, computing instead")
            return have
        finally:
            if leased:  # given up: the store's push would hold its blocks pinned until its own timeout
                self._release_later(leased)
            if tid is not None and not await self.receiver.cancel(tid):  # the store's push may still land
                raise TransferUnfencedError(
                    f"prefix load {tid}: the store's push could not be fenced", self.receiver.when_fenced(tid)
                )

    def _release_later(self, lease_id: str) -> None:
        """Release a read lease without waiting (this path is a failure's: the store may be slow)."""

        async def release() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.Release(kpb.ReleaseLeaseRequest(lease_id=lease_id), timeout=self.timeout_s)

        task = asyncio.create_task(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def store_blocks(self, hashes: list[bytes], src: list) -> int:
        """Offer full, computed blocks (in sequence order); returns how many the store took."""
        if not self._available():
            return 0
        with _spans.span("kvstore.store", blocks_offered=len(hashes)) as span:
            n = await self._store_blocks(hashes, src)
            tracing.annotate(span, blocks_stored=n)
            return n

    async def _store_blocks(self, hashes: list[bytes], src: list) -> int:
        try:
            r = await self.stub.ReserveWrite(
                kpb.ReserveWriteRequest(kv_fingerprint=self.fingerprint, block_hashes=hashes), timeout=self.timeout_s
            )
            self._answered()
            if not r.accepted_indices:
                return 0
            t = r.ticket
            if t.block_bytes != src[0].nbytes:  # another model, dtype or block size: no write will ever fit
                await self.stub.Release(kpb.ReleaseLeaseRequest(lease_id=t.transfer_id), timeout=self.timeout_s)
                self._mismatched(t.block_bytes, src[0].nbytes)
                return 0
            ticket = TransferTicket(t.transfer_id, t.secret, t.ucx_address, t.num_blocks, t.block_bytes)
            try:
                await self.sender.send(ticket, 0, [src[i] for i in r.accepted_indices], timeout=self.timeout_s)
            except Exception:
                await self.stub.Release(kpb.ReleaseLeaseRequest(lease_id=t.transfer_id), timeout=self.timeout_s)
                raise
            n = (
                await self.stub.CommitWrite(kpb.CommitWriteRequest(transfer_id=t.transfer_id), timeout=self.timeout_s)
            ).num_committed_blocks
            self.stored_blocks += n
            return n
        except Exception as e:  # noqa: BLE001 - a missed write only costs a later recompute
            tracing.fail(tracing.current_span(), e)
            self._failed(e, "write-back failed")
            return 0
