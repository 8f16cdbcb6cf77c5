"""In-process KV transfer with the same contract as ucx.py, for unit tests.

A sender copies blocks straight into the receiver's buffers through UCX's header, MAC and checksum checks;
`corrupt_blocks` provokes a checksum FAILED. Where it differs on purpose: docs/transfer.md ("Interface").
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import weakref

from pdserve.common.errors import TransferFailedError
from pdserve.common.transfer.base import (
    KVReceiver,
    KVSender,
    TransferStatus,
    TransferTicket,
    as_bytes,
    block_checksum,
    make_header,
    verify_block,
)

_RECEIVERS: weakref.WeakValueDictionary[bytes, LoopbackKVReceiver] = weakref.WeakValueDictionary()


class LoopbackKVReceiver(KVReceiver):
    transport = "loopback"

    def __init__(self) -> None:
        super().__init__()
        self._address = b"loopback:" + secrets.token_hex(8).encode()
        _RECEIVERS[self._address] = self
        self.closed = False

    @property
    def address(self) -> bytes:
        return self._address

    def expect(self, transfer_id: str, dest_buffers: list) -> TransferTicket:
        if self.closed:
            raise TransferFailedError("receiver is closed")
        return self._new(transfer_id, dest_buffers, secrets.token_bytes(32)).ticket

    def _deliver(self, ticket: TransferTicket, index: int, header: bytes, src, corrupt: bool) -> None:
        t = self._transfers.get(ticket.transfer_id)
        # Same rule as the keyed UCX tags: without this ticket's secret, nothing lands.
        if t is None or not hmac.compare_digest(t.ticket.secret, ticket.secret):
            raise TransferFailedError(f"transfer {ticket.transfer_id}: no such ticket here")
        if t.status is TransferStatus.FAILED:
            raise TransferFailedError(f"transfer {ticket.transfer_id}: {t.error}")
        # As over UCX, where each index has one posted receive: a block beyond the
        # ticket, or one already landed, matches nothing and lands nowhere.
        if not 0 <= index < t.ticket.num_blocks or index in t.landed:
            raise TransferFailedError(f"transfer {ticket.transfer_id}: no receive for block {index}")
        data = as_bytes(src)
        if data.size != t.ticket.block_bytes:  # UCX: a truncated receive, the transfer fails
            t.fail(f"block {index}: {data.size} bytes, the ticket's blocks have {t.ticket.block_bytes}")
            raise TransferFailedError(f"transfer {ticket.transfer_id}: {t.error}")
        dest = as_bytes(t.dest[index])
        dest[:] = data  # byte copy: any dtype, straight into the pool block
        if corrupt:
            dest[0] ^= 0xFF
        err = verify_block(t.ticket, index, header, t.dest[index])
        t.fail(err) if err else t.block_ok(index)

    async def cancel(self, transfer_id: str) -> bool:
        t = self._transfers.pop(transfer_id, None)
        if t is not None:
            t.fail("cancelled")
        return True  # copies are synchronous: none can be in flight

    async def close(self) -> None:
        for transfer_id in list(self._transfers):
            await self.cancel(transfer_id)
        self.closed = True
        _RECEIVERS.pop(self._address, None)


class LoopbackKVSender(KVSender):
    """`corrupt_blocks`: block indices whose bytes get flipped on arrival."""

    def __init__(self, corrupt_blocks: frozenset[int] = frozenset()) -> None:
        self.corrupt_blocks = corrupt_blocks
        self.sent_blocks = 0  # for tests: how many blocks went out
        self.closed = False

    transport = "loopback"

    async def _send(
        self, ticket: TransferTicket, first_block_index: int, src_buffers: list, timeout: float = 30.0
    ) -> None:
        self._check(ticket, first_block_index, src_buffers)
        if self.closed:
            raise TransferFailedError("sender is closed")
        receiver = _RECEIVERS.get(ticket.address)
        if receiver is None or receiver.closed:
            raise TransferFailedError(f"transfer {ticket.transfer_id}: receiver not reachable")
        for k, src in enumerate(src_buffers):
            i = first_block_index + k
            header = make_header(ticket, i, src.nbytes, block_checksum(src))
            receiver._deliver(ticket, i, header, src, i in self.corrupt_blocks)
            self.sent_blocks += 1
            await asyncio.sleep(0)  # let other tasks run between blocks, as a transport would

    async def close(self) -> None:
        self.closed = True
