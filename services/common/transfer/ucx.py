"""KV transfer over UCX: the only module in pdserve that imports ucxx (lazily).

Follows what was measured here (docs/transfer.md): endpoints from the peer's
worker address with error handling off, so UCX may use CMA / RDMA rather than
only TCP (peer death is caught by timeouts); receives posted on the worker
straight into pool blocks under keyed tags; and our own progress loop (_Worker)
instead of ucxx's asyncio modes, which burn a core while idle or lose bandwidth.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import time

import numpy as np

from pdserve.common.errors import TransferFailedError, TransferTimeoutError
from pdserve.common.transfer import netdev
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

log = logging.getLogger(__name__)

_SPIN_S = 0.0005  # keep polling this long after the last UCX event (events come in bursts)
# Then sleep on UCX's fd, but at most this long: wakeups measured here take ~0.2 ms
# when the shared-memory transport signals, yet some signals never come.
_MAX_SLEEP_S = 0.002
_AHEAD = 4  # data sent ahead of its header: vs 0, 4 MB sends ~1.5x faster, 64 MB same
_CLOSE_S = 0.05  # progress given to an endpoint's close before moving on
_QUIESCE_S = 0.5  # at close, the most spent taking in what peers still had in flight
_contexts: dict[tuple, object] = {}  # one UCX context per set of options (netdev.ucx_options)


def _ucx(host: str):
    """(libucxx, Array, UCXContext) for a data plane that listens only on `host`'s interfaces;
    each context is created on first use."""
    # ucxx sets UCX_MEMTYPE_CACHE, which libucx 1.21 no longer knows: silence the
    # warning. Blocks are host memory, so rendezvous fragments are host too.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    os.environ.setdefault("UCX_RNDV_FRAG_MEM_TYPE", "host")
    import ucxx._lib.libucxx as lib
    from ucxx._lib.arr import Array

    options = netdev.ucx_options(host)
    key = tuple(sorted(options.items()))
    if key not in _contexts:
        _contexts[key] = lib.UCXContext(options, feature_flags=(lib.Feature.TAG, lib.Feature.WAKEUP))
    return lib, Array, _contexts[key]


class _Group:
    """Requests awaited together. Completions are noticed in submission order, so
    each progress round costs O(newly completed), not O(all in flight). `keep`: buffers
    UCX reads or writes, held as long as the requests are."""

    __slots__ = ("reqs", "cursor", "on_done", "future", "keep")

    def __init__(self, reqs: list, on_done, future: asyncio.Future, keep=()) -> None:
        self.reqs, self.cursor, self.on_done, self.future, self.keep = reqs, 0, on_done, future, keep

    def advance(self) -> bool:
        reqs = self.reqs
        while self.cursor < len(reqs) and reqs[self.cursor].completed:
            if self.on_done is not None:
                try:
                    self.on_done(self.cursor, reqs[self.cursor])
                except Exception:  # a callback bug must not stop the progress loop
                    log.exception("transfer completion callback failed")
            self.cursor += 1
        if self.cursor < len(reqs):
            return False
        if not self.future.done():
            self.future.set_result(None)
        return True


class _Worker:
    """One UCX worker plus the asyncio task that progresses it only while needed.
    Use it from one event loop (the one of its first watch()). Its TCP listeners are on
    `host`'s interfaces only (netdev.py)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.lib, self.Array, ctx = _ucx(host)
        self.worker = self.lib.UCXWorker(ctx)
        self.address: bytes = self.worker.address.tobytes()
        self.worker.init_blocking_progress_mode()  # an epoll fd that fires on UCX events
        self._fd = self.worker.epoll_file_descriptor
        # An endpoint to this worker itself, made at start: libucx reads the routing table once
        # per process, at its first reachability check, and keeps it; were the first check a
        # transfer's during an outage, no peer would ever be reachable over TCP again
        # (tests/multihost). The receiver also drains its posted receives through it.
        self.self_ep = self.endpoint(self.address)
        self._any, self._any_mask = self.tag(0), self.lib.UCXXTagMask(0)  # matches every tag
        self._sink = self.Array(np.empty(0, np.uint8))
        self._groups: list[_Group] = []
        self._forgotten: list[_Group] = []  # given up on, yet still in UCX: keep their buffers
        self._waiter: asyncio.Future | None = None  # set while sleeping on the fd
        self._task: asyncio.Task | None = None
        self._closing = False

    def check_open(self) -> None:
        if self._closing:
            raise TransferFailedError("the KV transport is closed (the worker is shutting down)")

    def tag(self, value: int):
        return self.lib.UCXXTag(value)

    def endpoint(self, address: bytes):
        addr = self.lib.UCXAddress.create_from_buffer(address)
        return self.lib.UCXEndpoint.create_from_worker_address(self.worker, addr, False)

    def watch(self, reqs: list, on_done=None, keep=()) -> _Group:
        """Track `reqs`; on_done(position, request) runs as each is noticed complete."""
        loop = asyncio.get_running_loop()
        group = _Group(reqs, on_done, loop.create_future(), keep)
        self._groups.append(group)
        if self._task is None and not self._closing:  # close() progresses by itself
            self._task = loop.create_task(self._run(), name="ucx-progress")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # requests may have completed at submission
        return group

    def forget(self, group: _Group) -> None:
        """Stop waiting on `group`; UCX may still touch its buffers, so they stay held."""
        if group in self._groups:
            self._groups.remove(group)
            self._forgotten.append(group)

    def sink_unexpected(self) -> bool:
        """Take, as they arrive, the messages no receive was posted for (late blocks of a
        cancelled transfer, a forged ticket's, the 0-byte sends that cancelled one), into
        an empty buffer: truncated, so no byte is copied and the sender is let go. Left
        queued, they reach ucxx's worker destructor, which drains that queue itself and
        crashed the process doing so once their sender's endpoint was gone (a rendezvous
        reply through a freed endpoint, libucx 1.21, endpoint error handling off)."""
        reqs = []
        while (probe := self.worker.tag_probe(self._any, self._any_mask, remove=True)).matched:
            reqs.append(self.worker.tag_recv_with_handle(self._sink, probe))
        if reqs:
            self.watch(reqs)
        return bool(reqs)

    def _round(self) -> bool:
        """One progress round: UCX's events, unmatched messages taken, completions
        noticed. True if anything came in."""
        made = False
        while self.worker.progress_once():
            made = True
            self._advance()  # each block as it lands: verified while still in cache
        made |= self.sink_unexpected()
        self._advance()
        return made

    def _advance(self) -> None:
        for g in [g for g in self._groups if g.advance()]:  # callbacks may add groups
            self._groups.remove(g)

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            made = self._round()
            now = time.monotonic()
            if made:
                last = now
            if self._groups and now - last < _SPIN_S:
                await asyncio.sleep(0)
            elif self.worker.arm():  # nothing pending inside UCX: sleep until its fd fires
                # Idle, with no timer: it costs nothing, yet late blocks are sunk as they come.
                idle = not self._groups
                await self._sleep_on_fd(None if idle else _MAX_SLEEP_S)
                if idle:
                    last = time.monotonic()
            else:
                await asyncio.sleep(0)

    async def _sleep_on_fd(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        wake = lambda: waiter.done() or waiter.set_result(None)  # noqa: E731
        loop.add_reader(self._fd, wake)
        timer = loop.call_later(timeout, wake) if timeout is not None else None
        try:
            await waiter
        finally:
            loop.remove_reader(self._fd)
            if timer is not None:
                timer.cancel()
            self._waiter = None

    def close_endpoint(self, ep) -> None:
        """Force-close `ep`, cancelling what is in flight on it. Not close_blocking(): with
        no progress thread it ignores its period and spins forever on a send that the
        peer never matches (a transfer the receiver cancelled, then timed out here)."""
        try:
            ep.close()
            deadline = time.monotonic() + _CLOSE_S
            while self.worker.progress_once() and time.monotonic() < deadline:
                pass  # let the close's cancellations complete while there is work
            ep.remove_close_callback()
        except Exception:  # closing is best effort
            log.debug("endpoint close failed", exc_info=True)

    def _quiesce(self) -> None:
        """Take in what peers still had on the way, while they can answer (bounded)."""
        deadline = time.monotonic() + _QUIESCE_S
        while time.monotonic() < deadline:
            if not self._round() and not self._groups:
                return

    async def close(self) -> None:
        """Stop the progress task, drain, then let go of the worker now, not whenever a
        garbage collection finds it: its destructor must meet an empty queue."""
        if self._closing:
            return
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._quiesce()
        if self.self_ep is not None:
            self.close_endpoint(self.self_ep)
            self.self_ep = None
        self._groups.clear()
        self._forgotten.clear()
        self.worker = None


class UcxKVReceiver(KVReceiver):
    """Decode side. Posts a header and a data receive per block at expect()."""

    transport = "ucx"

    def __init__(self, drain_timeout: float = 5.0, host: str = "127.0.0.1") -> None:
        super().__init__()
        self._w = _Worker(host)
        self._drain_timeout = drain_timeout
        self._groups: dict[str, _Group] = {}
        self._parked: dict[str, tuple] = {}  # could not be drained: keep buffers referenced

    @property
    def address(self) -> bytes:
        return self._w.address

    def expect(self, transfer_id: str, dest_buffers: list) -> TransferTicket:
        self._w.check_open()
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
            # after the copy that wrote it (see _round): from cache, ~28 us a block.
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
        if open_tags:
            empty = self._w.Array(np.empty(0, np.uint8))
            self._w.watch([self._w.self_ep.tag_send(empty, self._w.tag(tag)) for tag in open_tags])
        try:
            await asyncio.wait_for(asyncio.shield(group.future), self._drain_timeout)
        except TimeoutError:
            log.error("transfer %s: receives not drained; its blocks must not be reused", transfer_id)
            self._w.forget(group)
            self._parked[transfer_id] = (t, group)
            return False
        return True

    async def close(self) -> None:
        for transfer_id in list(self._transfers):
            await self.cancel(transfer_id)
        await self._w.close()


class UcxKVSender(KVSender):
    """Prefill side. One cached endpoint per receiver address."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._w = _Worker(host)
        self._eps: dict[bytes, object] = {}
        self._retired: list = []  # endpoints to peers that timed out; closed at close()

    transport = "ucx"

    async def _send(self, ticket: TransferTicket, first_block_index: int, src_buffers: list,
                    timeout: float = 30.0) -> None:
        self._check(ticket, first_block_index, src_buffers)
        self._w.check_open()
        w, Array = self._w, self._w.Array
        keep, reqs = [], []  # `keep`: headers must outlive their sends, even forgotten ones
        try:
            ep = self._eps.get(ticket.address)
            if ep is None:  # raises at once if the peer is already gone (same host)
                ep = self._eps[ticket.address] = w.endpoint(ticket.address)
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
            raise TransferFailedError(f"transfer {ticket.transfer_id}: {e}") from e
        group = w.watch(reqs, keep=[*keep, *datas])
        try:
            await asyncio.wait_for(asyncio.shield(group.future), timeout)
        except TimeoutError:
            # Nobody matched (peer gone, cancelled, wrong secret); sends cannot be
            # withdrawn either: stop tracking them and stop reusing the endpoint.
            w.forget(group)
            if self._eps.get(ticket.address) is ep:
                self._retired.append(self._eps.pop(ticket.address))
            raise TransferTimeoutError(
                f"transfer {ticket.transfer_id}: blocks {first_block_index}.."
                f"+{len(src_buffers)} not taken within {timeout}s"
            ) from None
        for r in reqs:
            try:
                r.check_error()
            except Exception as e:
                raise TransferFailedError(f"transfer {ticket.transfer_id}: {e}") from e

    async def close(self) -> None:
        for ep in [*self._eps.values(), *self._retired]:
            self._w.close_endpoint(ep)
        self._eps.clear()
        self._retired.clear()
        await self._w.close()
