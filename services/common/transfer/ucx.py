"""KV transfer over UCX: the sender and the receiver (the worker they share is ucx_worker.py).

Follows what was measured here (docs/transfer.md): endpoints from the peer's
worker address with error handling off, so UCX may use CMA / RDMA rather than
only TCP (peer death is caught by timeouts); receives posted on the worker
straight into pool blocks under keyed tags.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from dataclasses import dataclass

import numpy as np

from pdserve.common.errors import InvalidRequestError, TransferFailedError, TransferTimeoutError
from pdserve.common.transfer.base import (
    HEADER_BYTES,
    Inbound,
    KVReceiver,
    KVSender,
    TransferStatus,
    TransferTicket,
    as_bytes,
    block_checksum,
    block_tag,
    make_header,
    verify_block,
)
from pdserve.common.transfer.ucx_worker import RequestGroup, UcxWorker

log = logging.getLogger(__name__)

_AHEAD = 4  # data sent ahead of its header: vs 0, 4 MB sends ~1.5x faster, 64 MB same
_IDLE_S = 300.0  # an endpoint unused this long is closed: a receiver that restarted has a new address
_PARKED_POLL_S = 0.5  # how often receives a cancel could not drain are looked at again
_Worker = UcxWorker  # the name tests/service/test_transfer_ucx.py drives a bare worker by


class UcxKVReceiver(KVReceiver):
    """Decode side. Posts a header and a data receive per block at expect()."""

    transport = "ucx"

    def __init__(self, drain_timeout: float = 5.0, host: str = "127.0.0.1") -> None:
        super().__init__()
        self._w = UcxWorker(host)
        self._drain_timeout = drain_timeout
        self._groups: dict[str, RequestGroup] = {}
        # Cancels that could not drain: (transfer, its receives or None if unknowable, its fence).
        self._parked: dict[str, tuple[Inbound, RequestGroup | None, asyncio.Future]] = {}
        self._watching: asyncio.Task | None = None

    @property
    def address(self) -> bytes:
        return self._w.address

    def expect(self, transfer_id: str, dest_buffers: list) -> TransferTicket:
        self._w.check_open()
        if transfer_id in self._parked:  # its fence would be lost
            raise InvalidRequestError("transfer_id", f"{transfer_id!r} was cancelled and is not fenced yet")
        t = self._new(transfer_id, dest_buffers, secrets.token_bytes(32))
        headers = np.zeros((len(t.dest), HEADER_BYTES), np.uint8)
        w, Array, reqs = self._w, self._w.Array, []
        for i, buf in enumerate(t.dest):  # interleaved H0 D0 H1 D1 ...: see _landed
            reqs.append(w.worker.tag_recv(Array(headers[i]), w.tag(block_tag(t.ticket, b"H", i))))
            reqs.append(w.worker.tag_recv(Array(as_bytes(buf)), w.tag(block_tag(t.ticket, b"D", i))))
        self._groups[transfer_id] = w.watch(reqs, functools.partial(self._landed, t, headers))
        return t.ticket

    def _landed(self, t: Inbound, headers: np.ndarray, pos: int, req) -> None:
        if t.status is TransferStatus.FAILED:
            return  # failed or cancelled: nothing more to verify
        i = pos // 2
        try:
            req.check_error()
        except Exception as e:  # e.g. truncated: the sender sent more than a block
            t.fail(f"block {i}: {type(e).__name__}: {e}")
            return
        t.status = TransferStatus.TRANSFERRING
        if pos % 2:  # the data after its header: both have landed. Verified inline, right
            # after the copy that wrote it (see UcxWorker._round): from cache, ~28 us a block.
            err = verify_block(t.ticket, i, headers[i], t.dest[i])
            t.fail(err) if err else t.block_ok(i)

    async def cancel(self, transfer_id: str) -> bool:
        t = self._transfers.pop(transfer_id, None)
        if t is None:
            return True
        t.fail("cancelled")
        group = self._groups.pop(transfer_id)
        # ucxx cannot withdraw one posted receive, so complete each open one with a
        # 0-byte message from ourselves (one that matched the real sender finishes
        # its copy instead). Once the group is done, nothing can land any more.
        open_tags = [
            block_tag(t.ticket, b"HD"[p % 2 : p % 2 + 1], p // 2)
            for p in range(group.cursor, len(group.reqs))
            if not group.reqs[p].completed
        ]
        try:
            if open_tags:
                empty = self._w.Array(np.empty(0, np.uint8))
                self._w.watch([self._w.self_ep.tag_send(empty, self._w.tag(tag)) for tag in open_tags])
            await asyncio.wait_for(asyncio.shield(group.future), self._drain_timeout)
        except TimeoutError:
            log.error("transfer %s: receives not drained; its blocks must not be reused until they are", transfer_id)
            self._w.forget(group)
            self._park(transfer_id, t, group)
            return False
        except Exception:  # the worker failing (closing): whether data may still land is unknown
            log.exception("transfer %s: receives not withdrawn; its blocks must not be reused", transfer_id)
            self._park(transfer_id, t, None)
            return False
        return True

    def when_fenced(self, transfer_id: str) -> asyncio.Future:
        parked = self._parked.get(transfer_id)
        if parked is not None:
            return parked[2]
        fenced = asyncio.get_running_loop().create_future()  # not parked: fenced at its cancel, or unknown
        fenced.set_result(None)
        return fenced

    def _park(self, transfer_id: str, t: Inbound, group: RequestGroup | None) -> None:
        self._parked[transfer_id] = (t, group, asyncio.get_running_loop().create_future())
        if group is not None and (self._watching is None or self._watching.done()):
            self._watching = asyncio.create_task(self._watch_parked(), name="ucx-parked")

    async def _watch_parked(self) -> None:
        """A receive a stalled sender left mid-message may still complete (the rest of it arrives);
        once every receive of a parked transfer has, nothing can land in its buffers any more."""
        while any(group is not None for _, group, _ in self._parked.values()):
            await asyncio.sleep(_PARKED_POLL_S)
            for transfer_id, (_, group, fence) in list(self._parked.items()):
                if group is not None and all(r.completed for r in group.reqs):
                    del self._parked[transfer_id]
                    log.warning("transfer %s: its receives completed after all; its blocks can be reused", transfer_id)
                    if not fence.done():
                        fence.set_result(None)

    async def close(self) -> None:
        for transfer_id in list(self._transfers):
            await self.cancel(transfer_id)
        if self._watching is not None:
            self._watching.cancel()
        for _, _, fence in self._parked.values():
            fence.cancel()  # the process is going: nobody will reuse those blocks
        await self._w.close()


@dataclass(eq=False)
class _Endpoint:
    address: bytes
    ep: object
    sends: int = 0  # sends on it in flight, not yet given up on
    last_used: float = 0.0


class UcxKVSender(KVSender):
    """Prefill side. One cached endpoint per receiver address, closed once idle or retired."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._w = UcxWorker(host)
        self._eps: dict[bytes, _Endpoint] = {}
        self._retired: list[_Endpoint] = []  # to peers that timed out: closed once no send of theirs is awaited

    transport = "ucx"

    def _endpoint(self, address: bytes) -> _Endpoint:
        self._prune()
        peer = self._eps.get(address)
        if peer is None:  # raises at once if the peer is already gone (same host)
            peer = self._eps[address] = _Endpoint(address, self._w.endpoint(address))
        peer.sends += 1
        peer.last_used = time.monotonic()
        return peer

    def _prune(self) -> None:
        """Close endpoints idle for _IDLE_S (a receiver back under a new address never uses its
        old one again) and retired ones no send awaits any more: closing cancels the sends
        given up on, so UCX lets go of their buffers."""
        now = time.monotonic()
        idle = [p for p in self._eps.values() if not p.sends and now - p.last_used > _IDLE_S]
        done = [p for p in self._retired if not p.sends]
        for p in idle:
            del self._eps[p.address]
        self._retired = [p for p in self._retired if p.sends]
        for p in [*idle, *done]:
            self._w.close_endpoint(p.ep)

    async def _send(
        self, ticket: TransferTicket, first_block_index: int, src_buffers: list, timeout: float = 30.0
    ) -> None:
        self._check(ticket, first_block_index, src_buffers)
        self._w.check_open()
        w, Array = self._w, self._w.Array
        keep, reqs = [], []  # `keep`: headers must outlive their sends, even forgotten ones
        try:
            peer = self._endpoint(ticket.address)
        except Exception as e:
            raise TransferFailedError(f"transfer {ticket.transfer_id}: {e}") from e
        try:
            ep = peer.ep
            datas = [as_bytes(buf) for buf in src_buffers]
            # Data runs _AHEAD blocks ahead of its header: the receiver pulls while we
            # checksum, and still verifies each block while it is in cache.
            for k in range(len(datas) + _AHEAD):
                if k < len(datas):
                    tag = w.tag(block_tag(ticket, b"D", first_block_index + k))
                    reqs.append(ep.tag_send(Array(datas[k]), tag))
                if 0 <= k - _AHEAD < len(datas):
                    i, data = first_block_index + k - _AHEAD, datas[k - _AHEAD]
                    header = np.frombuffer(make_header(ticket, i, data.size, block_checksum(data)), np.uint8)
                    keep.append(header)
                    reqs.append(ep.tag_send(Array(header), w.tag(block_tag(ticket, b"H", i))))
        except Exception as e:
            peer.sends -= 1
            raise TransferFailedError(f"transfer {ticket.transfer_id}: {e}") from e
        group = w.watch(reqs, keep=[*keep, *datas])
        try:
            await asyncio.wait_for(asyncio.shield(group.future), timeout)
        except asyncio.CancelledError:
            # The caller left, the sends go on: given what is left of their time, then let go
            # as on a timeout (to a dead peer, tracked for ever, they woke the loop every 2 ms).
            asyncio.get_running_loop().call_later(timeout, self._give_up, group, peer)
            raise
        except TimeoutError:
            self._give_up(group, peer)
            raise TransferTimeoutError(
                f"transfer {ticket.transfer_id}: blocks {first_block_index}.."
                f"+{len(src_buffers)} not taken within {timeout}s"
            ) from None
        peer.sends -= 1
        for r in reqs:
            try:
                r.check_error()
            except Exception as e:
                raise TransferFailedError(f"transfer {ticket.transfer_id}: {e}") from e

    def _give_up(self, group: RequestGroup, peer: _Endpoint) -> None:
        """Sends nobody took (peer gone, transfer cancelled, wrong secret) cannot be withdrawn:
        stop tracking them, and stop reusing their endpoint."""
        peer.sends -= 1
        if group.future.done() or self._w.worker is None:
            return
        self._w.forget(group)
        if self._eps.get(peer.address) is peer:
            self._retired.append(self._eps.pop(peer.address))

    async def close(self) -> None:
        for p in [*self._eps.values(), *self._retired]:
            self._w.close_endpoint(p.ep)
        self._eps.clear()
        self._retired.clear()
        await self._w.close()
