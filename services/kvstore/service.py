"""The KV store's operations over the data plane: a write reserves slots, the writer pushes
and CommitWrite publishes them once verified; a read pins blocks and pushes them to the
reader. Every reservation and pin is a lease that expires if the peer vanishes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from pdserve.common import tracing
from pdserve.common.errors import InvalidRequestError, NotFoundError, TransferFailedError
from pdserve.common.kv.hashing import HASH_BYTES
from pdserve.common.leases import Leases
from pdserve.common.transfer.base import KVReceiver, KVSender, TransferTicket
from pdserve.common.transfer.fence import Reclaims
from pdserve.kvstore.store import BlockStore

log = logging.getLogger(__name__)


MAX_CHAIN = 1 << 16  # blocks of one prompt: a million tokens at 16 a block


def _chain(hashes: list[bytes]) -> list[bytes]:
    """A client's block hashes, if they can be: each of hashing's size, a prompt's count at most (a
    million would evict the whole store in one offer, and post a receive each)."""
    if len(hashes) > MAX_CHAIN:
        raise InvalidRequestError("block_hashes", f"{len(hashes)} hashes; at most {MAX_CHAIN}")
    if any(len(h) != HASH_BYTES for h in hashes):
        raise InvalidRequestError("block_hashes", f"each must be a {HASH_BYTES}-byte block hash")
    return hashes


class KVStoreService:
    def __init__(
        self,
        store: BlockStore,
        receiver: KVReceiver,
        sender: KVSender,
        *,
        lease_s: float = 30.0,
        transfer_timeout_s: float = 30.0,
    ):
        self.store = store
        self.receiver = receiver
        self.sender = sender
        self.lease_s = lease_s
        self.transfer_timeout_s = transfer_timeout_s
        self._writes: Leases[list[bytes]] = Leases(self.release, "kvstore write")  # the slots' hashes
        self._reads: dict[str, asyncio.Task] = {}  # pinned until the push ends
        self._reclaims = Reclaims()  # quarantined slots, back once their writes are fenced

    async def start(self) -> None:
        self._writes.start()

    async def aclose(self) -> None:
        """Leases and reads in flight, then the data plane it was given (its own)."""
        self._writes.stop()
        for tid in self._writes:
            await self.release(tid)
        for task in list(self._reads.values()):
            task.cancel()
        await asyncio.gather(*self._reads.values(), return_exceptions=True)
        await self.receiver.close()
        await self.sender.close()
        self._reclaims.cancel()

    def lookup(self, fingerprint: bytes, hashes: list[bytes]) -> int:
        n = self.store.lookup(fingerprint, _chain(hashes))
        tracing.annotate(blocks_requested=len(hashes), blocks_found=n)  # on the call's span
        return n

    def reserve_write(
        self, fingerprint: bytes, hashes: list[bytes], lease_ms: int = 0
    ) -> tuple[list[int], TransferTicket | None]:
        placed = self.store.reserve_write(fingerprint, _chain(hashes))
        tracing.annotate(blocks_offered=len(hashes), blocks_accepted=len(placed))
        if not placed:
            return [], None
        tid = "w-" + uuid.uuid4().hex
        accepted = [hashes[i] for i, _ in placed]
        try:
            ticket = self.receiver.expect(tid, [self.store.buffer(slot) for _, slot in placed])
        except Exception:
            self.store.abort_write(accepted)
            raise
        # A client may ask for less than the store's lease, not more: a writer gone leaves WRITING
        # slots, which nothing evicts, until it ends.
        self._writes.add(tid, accepted, min(lease_ms / 1000, self.lease_s) if lease_ms else self.lease_s)
        return [i for i, _ in placed], ticket

    async def commit_write(self, transfer_id: str) -> int:
        hashes = self._writes.claim(transfer_id)  # the transfer timeout bounds it from here
        if hashes is None:
            raise NotFoundError(f"no write {transfer_id!r} (expired or released)")
        try:
            await self.receiver.wait(transfer_id, self.transfer_timeout_s)
            await self.receiver.cancel(transfer_id)  # forget the landed transfer
        except BaseException:  # a cancel too: the claimed lease no longer expires
            await self.release(transfer_id)
            raise
        if self._writes.pop(transfer_id) is None:  # released meanwhile: its slots may be another write's now
            raise NotFoundError(f"write {transfer_id!r} was released before it was committed")
        n = self.store.commit(hashes)
        tracing.annotate(blocks_committed=n)
        return n

    def reserve_read(self, fingerprint: bytes, hashes: list[bytes], ticket: TransferTicket) -> int:
        """Pin all of `hashes` and push them into `ticket`; 0 if any is gone."""
        if ticket.num_blocks < 1 or len(hashes) != ticket.num_blocks:
            raise InvalidRequestError("ticket.num_blocks", f"{ticket.num_blocks} blocks for {len(hashes)} hashes")
        if ticket.transfer_id in self._reads:  # its lease id: two reads under one would free each other
            raise InvalidRequestError("ticket.transfer_id", f"{ticket.transfer_id!r} is already being read")
        if ticket.block_bytes != self.store.block_bytes:
            raise TransferFailedError("read ticket's block size is not this store's")
        slots = self.store.pin(fingerprint, _chain(hashes))
        tracing.annotate(blocks_requested=len(hashes), blocks_read=len(slots) if slots else 0)
        if slots is None:
            return 0
        lease = ticket.transfer_id
        task = asyncio.create_task(self._push(lease, hashes, slots, ticket))
        self._reads[lease] = task
        return len(slots)

    async def _push(self, lease: str, hashes: list[bytes], slots: list[int], ticket: TransferTicket) -> None:
        ok = False
        try:
            await self.sender.send(ticket, 0, [self.store.buffer(s) for s in slots], timeout=self.transfer_timeout_s)
            ok = True
        except Exception as e:
            log.warning("read push %s failed: %s", lease, e)
        finally:
            self.store.unpin(hashes, read=ok)
            self._reads.pop(lease, None)

    async def release(self, lease_id: str) -> bool:
        """Shielded: half done (lease popped, slots not yet aborted) would strand them."""
        return await asyncio.shield(self._release(lease_id))

    async def _release(self, lease_id: str) -> bool:
        hashes = self._writes.pop(lease_id)
        if hashes is not None:
            if await self.receiver.cancel(lease_id):
                self.store.abort_write(hashes)
            else:
                log.error("write %s could not be fenced; its %d slots are quarantined", lease_id, len(hashes))
                slots = self.store.quarantine(hashes)
                self._reclaims.after(self.receiver.when_fenced(lease_id), lambda: self.store.reclaim(slots), lease_id)
            return True
        task = self._reads.get(lease_id)
        if task is not None:
            task.cancel()
            return True
        return False

    @property
    def active_leases(self) -> int:
        return len(self._writes) + len(self._reads)
