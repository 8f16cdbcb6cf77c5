"""The UCX worker under the KV transport: the only module in pdserve that imports ucxx (lazily).

Holds one UCX context per interface set, the worker with our own progress loop
(UcxWorker) and its endpoints; ucx.py builds the sender and receiver on it.
Our own loop instead of ucxx's asyncio modes, which burn a core while idle or
lose bandwidth (docs/transfer.md, "Progress").
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import numpy as np

from pdserve.common.errors import TransferFailedError
from pdserve.common.transfer import netdev

log = logging.getLogger(__name__)

_SPIN_S = 0.0005  # keep polling this long after the last UCX event (events come in bursts)
# Then sleep on UCX's fd, but at most this long: wakeups measured here take ~0.2 ms
# when the shared-memory transport signals, yet some signals never come.
_MAX_SLEEP_S = 0.002
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


class RequestGroup:
    """Requests awaited together. Completions are noticed in submission order, so
    each progress round costs O(newly completed), not O(all in flight). `keep`: buffers
    UCX reads or writes, held as long as the requests are."""

    __slots__ = ("reqs", "cursor", "on_done", "future", "keep")

    def __init__(self, reqs: list, on_done, future: asyncio.Future, keep=()) -> None:
        self.reqs = reqs
        self.cursor = 0
        self.on_done = on_done
        self.future = future
        self.keep = keep

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


class UcxWorker:
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
        self._any = self.tag(0)
        self._any_mask = self.lib.UCXXTagMask(0)  # matches every tag
        self._sink = self.Array(np.empty(0, np.uint8))
        self._groups: list[RequestGroup] = []
        self._forgotten: list[RequestGroup] = []  # given up on, yet still in UCX: keep their buffers
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

    def watch(self, reqs: list, on_done=None, keep=()) -> RequestGroup:
        """Track `reqs`; on_done(position, request) runs as each is noticed complete."""
        loop = asyncio.get_running_loop()
        group = RequestGroup(reqs, on_done, loop.create_future(), keep)
        self._groups.append(group)
        if self._task is None and not self._closing:  # close() progresses by itself
            self._task = loop.create_task(self._run(), name="ucx-progress")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # requests may have completed at submission
        return group

    def forget(self, group: RequestGroup) -> None:
        """Stop waiting on `group`; UCX may still touch its buffers, so they stay held."""
        # Those whose sends an endpoint's close has since cancelled are done with their buffers.
        self._forgotten = [g for g in self._forgotten if not all(r.completed for r in g.reqs)]
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
