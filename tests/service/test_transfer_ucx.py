"""KV transfer over real UCX between two OS processes (a decode-like receiver and a
prefill-like sender), each with its own KV pool of SmolLM2-sized blocks.

The two processes live for the whole module (starting torch + UCX costs seconds);
the test drives them with small commands over pipes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from pdserve.common.kv.spec import KVSpec
from tests.polling import eventually

SPEC = KVSpec("SmolLM2-135M-Instruct", "test", num_layers=30, num_kv_heads=3, head_dim=64)
POOL_BLOCKS = 12


def _pattern(seed: int, index: int):
    """Block `index` of transfer `seed`: what the sender sends, the receiver expects."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + index)
    return torch.randn(SPEC.block_shape, generator=g)


# ---- child processes ------------------------------------------------------------
async def _recv_cmd(rx, pool, cmd, *a):
    from pdserve.common.errors import NotFoundError

    if cmd == "expect":  # (tid, block_ids) -> ticket fields
        return dataclasses.asdict(rx.expect(a[0], [pool.block(b) for b in a[1]]))
    if cmd == "wait":
        await rx.wait(a[0], a[1])
        return rx.status(a[0]).name
    if cmd == "status":
        try:
            return rx.status(a[0]).name
        except NotFoundError:
            return "UNKNOWN"
    if cmd == "cancel":
        return await rx.cancel(a[0])
    if cmd == "check":  # (seed, block_ids) -> which blocks hold the pattern, which are zero
        seed, ids = a
        match = [bool(pool.block(b).equal(_pattern(seed, i))) for i, b in enumerate(ids)]
        zero = [b for b in range(pool.num_blocks) if not pool.block(b).any()]
        return match, zero
    if cmd == "zero":
        pool.tensor.zero_()
        return None
    if cmd == "idle_cpu":
        c0 = time.process_time()
        await asyncio.sleep(a[0])
        return time.process_time() - c0
    raise ValueError(cmd)


async def _send_cmd(tx, pool, cmd, *a):
    from pdserve.common.transfer import TransferTicket, ucx
    from pdserve.common.transfer.base import as_bytes

    if cmd == "send":  # (ticket fields, first, count, seed, timeout, corrupt: False, "header" or "payload")
        fields, first, count, seed, timeout, corrupt = a
        ticket = TransferTicket(**fields)
        for k in range(count):
            pool.block(k).copy_(_pattern(seed, first + k))
        real = ucx.block_checksum
        if corrupt == "header":  # the header claims a checksum the data does not have
            ucx.block_checksum = lambda buf: bytes(16)
        elif corrupt == "payload":  # the header is true to the data as hashed; then one byte of
            # the second block flips before UCX reads it (as a flip on the wire would)
            victim = as_bytes(pool.block(1))
            hashed = real(victim)
            victim[victim.size // 2] ^= 0x10
            ucx.block_checksum = lambda buf: hashed if buf.ctypes.data == victim.ctypes.data else real(buf)
        try:
            await tx.send(ticket, first, [pool.block(k) for k in range(count)], timeout=timeout)
        finally:
            ucx.block_checksum = real
        return None
    if (
        cmd == "send_cancelled"
    ):  # (ticket fields, count, timeout, cancel_after, then) -> (groups tracked, retired since)
        fields, count, timeout, cancel_after, then = a
        retired = len(tx._retired)
        send = asyncio.create_task(tx.send(TransferTicket(**fields), 0, [pool.block(k) for k in range(count)], timeout))
        await asyncio.sleep(cancel_after)
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
        await asyncio.sleep(then)
        return len(tx._w._groups), len(tx._retired) - retired
    if cmd == "endpoints":  # -> (endpoints cached, endpoints retired)
        return len(tx._eps), len(tx._retired)
    if cmd == "idle_after":  # (seconds): endpoints unused this long are closed at the next send
        ucx._IDLE_S = a[0]
        return None
    raise ValueError(cmd)


def _child(role: str, conn) -> None:
    async def main():
        from pdserve.common.kv.pool import KVPool
        from pdserve.common.transfer import UcxKVReceiver, UcxKVSender

        loop = asyncio.get_running_loop()
        pool = KVPool(SPEC, POOL_BLOCKS)
        obj = UcxKVReceiver(drain_timeout=2.0) if role == "recv" else UcxKVSender()
        handler = _recv_cmd if role == "recv" else _send_cmd
        conn.send("ready")
        while True:
            cmd, *args = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":  # close, then destroy it here: the child exits with os._exit
                await obj.close()
                del obj
                gc.collect()
                conn.send(("ok", None))
                return
            try:
                conn.send(("ok", await handler(obj, pool, cmd, *args)))
            except Exception as e:
                conn.send(("err", type(e).__name__, str(e)))

    asyncio.run(main())


class Peer:
    def __init__(self, role: str) -> None:
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_child, args=(role, child), daemon=True)
        self.proc.start()

    def ready(self) -> None:
        assert self.conn.poll(60), "peer did not start"
        assert self.conn.recv() == "ready"

    def __call__(self, *cmd, timeout: float = 20.0):
        """Run a command; returns its result, or ("err", ExceptionName, message)."""
        self.conn.send(cmd)
        assert self.conn.poll(timeout), f"{cmd[0]} did not answer"
        reply = self.conn.recv()
        return reply[1] if reply[0] == "ok" else reply

    def stop(self) -> None:
        self("stop")
        self.proc.join(10)


@pytest.fixture(scope="module")
def peers():
    rx, tx = Peer("recv"), Peer("send")
    rx.ready()
    tx.ready()
    yield rx, tx
    tx.stop()
    rx.stop()


@pytest.fixture
def rx(peers):
    peers[0]("zero")
    return peers[0]


@pytest.fixture
def tx(peers):
    return peers[1]


def _status_soon(rx, transfer_id: str, status: str) -> bool:
    """A chunk's last message is a small header, which completes on the sender as soon
    as it is buffered: the receiver may not have seen it yet when send() returns."""
    return eventually(lambda: rx("status", transfer_id) == status, 5.0, interval=0.01)


def test_blocks_land_intact_chunk_by_chunk(rx, tx):
    dest = [7, 2, 9, 4, 11, 0]  # scattered pool blocks, as a block table would be
    ticket = rx("expect", "t-ok", dest)
    assert ticket["num_blocks"] == 6 and ticket["block_bytes"] == SPEC.block_bytes == 737_280
    assert len(ticket["secret"]) >= 16
    assert tx("send", ticket, 0, 4, 1, 10.0, False) is None  # first prefill chunk
    assert _status_soon(rx, "t-ok", "TRANSFERRING")
    assert tx("send", ticket, 4, 2, 1, 10.0, False) is None  # second chunk
    assert rx("wait", "t-ok", 5.0) == "DONE"
    match, zero = rx("check", 1, dest)
    assert all(match)
    assert sorted(zero) == sorted(set(range(POOL_BLOCKS)) - set(dest))  # nothing else written
    assert rx("cancel", "t-ok") is True and rx("status", "t-ok") == "UNKNOWN"


def test_wrong_secret_is_refused_and_nothing_lands(rx, tx):
    ticket = rx("expect", "t-secret", [1, 3])
    forged = {**ticket, "secret": bytes(32)}
    # Its tags match no posted receive: the receiver takes its messages into an empty
    # buffer and drops them, so the sender is let go at once and nothing is written.
    assert tx("send", forged, 0, 2, 2, 5.0, False) is None
    assert rx("status", "t-secret") == "PENDING"
    assert len(rx("check", 2, [1, 3])[1]) == POOL_BLOCKS  # every block still zero
    # The real sender is unaffected: the receives were never consumed.
    assert tx("send", ticket, 0, 2, 2, 10.0, False) is None
    assert rx("wait", "t-secret", 5.0) == "DONE" and all(rx("check", 2, [1, 3])[0])
    rx("cancel", "t-secret")


def test_checksum_mismatch_fails_the_transfer(rx, tx):
    ticket = rx("expect", "t-bad", [5, 6])
    assert tx("send", ticket, 0, 2, 3, 10.0, "header") is None  # bytes arrive, checksum is wrong
    err = rx("wait", "t-bad", 5.0)
    assert err[:2] == ("err", "TransferFailedError") and "checksum mismatch" in err[2]
    assert rx("status", "t-bad") == "FAILED"
    assert rx("cancel", "t-bad") is True


def test_a_payload_byte_flipped_in_flight_fails_the_transfer_and_its_blocks_can_be_reused(rx, tx):
    dest = [5, 6, 7]
    ticket = rx("expect", "t-flip", dest)
    assert tx("send", ticket, 0, 3, 3, 10.0, "payload") is None  # block 1 lands with one bit flipped
    err = rx("wait", "t-flip", 5.0)
    assert err[:2] == ("err", "TransferFailedError") and err[2].endswith("block 1: checksum mismatch"), err
    assert rx("status", "t-flip") == "FAILED"
    assert rx("cancel", "t-flip") is True  # every receive has completed: nothing can land any more
    again = rx("expect", "t-after-flip", dest)  # so the same blocks serve the next transfer
    assert tx("send", again, 0, 3, 4, 10.0, False) is None
    assert rx("wait", "t-after-flip", 5.0) == "DONE" and all(rx("check", 4, dest)[0])
    rx("cancel", "t-after-flip")


def test_header_that_contradicts_the_ticket_fails(rx, tx):
    ticket = rx("expect", "t-hdr", [8])
    lying = {**ticket, "num_blocks": 2}  # right secret, wrong claim about the transfer
    assert tx("send", lying, 0, 1, 4, 10.0, False) is None
    err = rx("wait", "t-hdr", 5.0)
    assert err[:2] == ("err", "TransferFailedError") and "does not match the ticket" in err[2]
    rx("cancel", "t-hdr")


def test_wait_times_out_when_nothing_is_sent(rx):
    rx("expect", "t-slow", [10])
    t0 = time.monotonic()
    err = rx("wait", "t-slow", 0.3)
    assert err[:2] == ("err", "TransferTimeoutError") and time.monotonic() - t0 < 5
    assert rx("status", "t-slow") == "PENDING"
    assert rx("cancel", "t-slow") is True


def test_cancel_frees_the_blocks_and_late_data_never_lands(rx, tx):
    dest = [1, 2, 3]
    old = rx("expect", "t-cancel", dest)
    assert tx("send", old, 0, 1, 5, 10.0, False) is None  # one chunk made it
    assert _status_soon(rx, "t-cancel", "TRANSFERRING")
    assert rx("cancel", "t-cancel") is True
    assert rx("status", "t-cancel") == "UNKNOWN"
    rx("zero")
    # The blocks go to a new transfer; the old sender's late chunk must not land.
    new = rx("expect", "t-reuse", dest)
    assert tx("send", old, 1, 2, 5, 5.0, False) is None  # taken and dropped, not left queued
    assert len(rx("check", 5, dest)[1]) == POOL_BLOCKS  # still all zero
    assert tx("send", new, 0, 3, 6, 10.0, False) is None
    assert rx("wait", "t-reuse", 5.0) == "DONE" and all(rx("check", 6, dest)[0])
    rx("cancel", "t-reuse")


def test_receiver_costs_no_cpu_when_idle(rx):
    # The progress loop parks when nothing is in flight (ucxx's polling mode would
    # keep a core at 100%).
    assert rx("idle_cpu", 0.5) < 0.1


def test_dead_receiver_gives_the_sender_a_timeout_not_a_crash(rx, tx):
    doomed = Peer("recv")
    doomed.ready()
    first, second = doomed("expect", "t-a", [0]), doomed("expect", "t-b", [1])
    assert tx("send", first, 0, 1, 7, 10.0, False) is None  # endpoint established
    doomed.proc.kill()
    doomed.proc.join(10)
    # Endpoint error handling is off (for speed), so UCX does not report the death:
    # the transfer timeout does.
    err = tx("send", second, 0, 1, 7, 1.0, False)
    assert err[:2] == ("err", "TransferTimeoutError")
    ticket = rx("expect", "t-after", [4])  # the sender still serves live receivers
    assert tx("send", ticket, 0, 1, 8, 10.0, False) is None
    assert rx("wait", "t-after", 5.0) == "DONE"
    rx("cancel", "t-after")


def test_endpoints_to_gone_or_idle_receivers_are_closed_and_sending_goes_on(rx, tx):
    # A receiver that restarts comes back under a new address: its old endpoint would never be used
    # or closed again. Retired endpoints close at the next send, idle ones after a while.
    doomed = Peer("recv")
    doomed.ready()
    first, second = doomed("expect", "t-a", [0]), doomed("expect", "t-b", [1])
    assert tx("send", first, 0, 1, 7, 10.0, False) is None
    doomed.proc.kill()
    doomed.proc.join(10)
    assert tx("send", second, 0, 1, 7, 1.0, False)[:2] == ("err", "TransferTimeoutError")
    assert tx("endpoints")[1] >= 1  # retired
    ticket = rx("expect", "t-next", [4])
    assert tx("send", ticket, 0, 1, 8, 10.0, False) is None and rx("wait", "t-next", 5.0) == "DONE"
    assert tx("endpoints")[1] == 0  # closed before that send
    rx("cancel", "t-next")
    try:
        tx("idle_after", 0.0)
        ticket = rx("expect", "t-idle", [5])
        assert tx("send", ticket, 0, 1, 9, 10.0, False) is None and rx("wait", "t-idle", 5.0) == "DONE"
        assert tx("endpoints") == (1, 0)  # the others (earlier tests' receivers) closed: idle
        assert all(rx("check", 9, [5])[0])
    finally:
        tx("idle_after", 300.0)
        rx("cancel", "t-idle")


def test_a_sender_closes_at_once_with_a_send_nobody_will_take():
    # The receiver is frozen (SIGSTOP), so the send times out with its requests still
    # posted; closing must not wait on them (ucxx's close_blocking ignores its period
    # without a progress thread and spins forever there).
    frozen, sender = Peer("recv"), Peer("send")
    frozen.ready()
    sender.ready()
    ticket = frozen("expect", "t-gone", [0, 1])
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        err = sender("send", ticket, 0, 2, 9, 0.5, False)
        assert err[:2] == ("err", "TransferTimeoutError")
        t0 = time.monotonic()
        assert sender("stop", timeout=10) is None
        assert time.monotonic() - t0 < 5
        sender.proc.join(10)
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
        frozen.proc.kill()
        frozen.proc.join(10)


def test_a_cancelled_send_nobody_takes_is_let_go_after_its_timeout(tx):
    # The push's caller left (its request was cancelled) while the receiver is frozen: tracked
    # for ever, the sends kept the progress loop waking every 2 ms for good.
    frozen = Peer("recv")
    frozen.ready()
    ticket = frozen("expect", "t-left", [0, 1])
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        groups, retired = tx("send_cancelled", ticket, 2, 0.5, 0.1, 1.0)
        assert groups == 0 and retired == 1
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
        frozen.proc.kill()
        frozen.proc.join(10)


_LATE_BLOCK_FROM_A_GONE_SENDER = """
import asyncio, gc, time
import numpy as np
from pdserve.common.transfer import ucx

def progress(w, seconds=0.15):
    t = time.monotonic()
    while time.monotonic() - t < seconds:
        w.worker.progress_once()

async def main():
    rx, tx = ucx._Worker(), ucx._Worker()
    ep = tx.endpoint(rx.address)
    block = np.ones(737280, np.uint8)  # a KV block's size: sent by rendezvous
    req = ep.tag_send(tx.Array(block), tx.tag(1234))  # no receive is posted for its tag
    for _ in range(30):
        progress(tx, 0.005), progress(rx, 0.005)
    tx.close_endpoint(ep)  # the sender gives up and goes
    await tx.close()
    del ep, req, tx
    gc.collect()
    progress(rx, 0.3)  # the receiver notices
    await rx.close()
    del rx
    gc.collect()
    print("destroyed")

asyncio.run(main())
"""


def test_a_receiver_still_holding_a_block_from_a_sender_now_gone_closes_and_is_destroyed():
    # Over TCP the receiver learns that the sender's endpoint died; a block the sender
    # sent before going still sits in the receiver's queue. ucxx's worker destructor
    # drains that queue itself and hung there (or crashed: a rendezvous reply through
    # the freed endpoint); the receiver now takes such messages first.
    env = {**os.environ, "UCX_TLS": "tcp"}
    run = subprocess.run(
        [sys.executable, "-c", _LATE_BLOCK_FROM_A_GONE_SENDER], env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0 and "destroyed" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("transport", ["ucx", "loopback"])
def test_once_closed_a_receiver_and_a_sender_refuse_new_transfers_by_name(transport):
    from pdserve.common.errors import TransferFailedError
    from pdserve.common.kv.pool import KVPool
    from pdserve.common.transfer.transport import make_receiver, make_sender
    from pdserve.common.worker_config import WorkerConfig

    async def scenario():
        pool = KVPool(SPEC, 2)
        config = WorkerConfig(transport=transport)  # on 127.0.0.1
        rx, tx = make_receiver(config), make_sender(config)
        ticket = rx.expect("t-open", [pool.block(0)])
        await rx.close()
        await tx.close()
        with pytest.raises(TransferFailedError, match="closed"):
            rx.expect("t-late", [pool.block(1)])
        with pytest.raises(TransferFailedError, match="closed"):
            await tx.send(ticket, 0, [pool.block(0)], timeout=1.0)

    asyncio.run(scenario())


def test_a_cancel_the_failing_ucx_worker_cannot_carry_out_says_the_blocks_are_not_fenced():
    """Its contract is a bool: False (quarantine the blocks) when landing cannot be ruled out. Raised,
    the decode worker's lease was already gone and the reservation held its blocks for good."""
    from pdserve.common.kv.pool import KVPool
    from pdserve.common.transfer.transport import make_receiver
    from pdserve.common.worker_config import WorkerConfig

    async def scenario():
        pool = KVPool(SPEC, 2)
        rx = make_receiver(WorkerConfig(transport="ucx"))
        try:
            rx.expect("t", [pool.block(0), pool.block(1)])
            worker = rx._w

            def closing(*_):
                raise RuntimeError("UCX worker closing")

            real, worker.watch = worker.watch, closing  # the withdrawal's sends fail as on a closing worker
            try:
                assert await rx.cancel("t") is False
            finally:
                worker.watch = real
            await asyncio.sleep(1.0)  # two looks of the receiver's watch on its parked receives
            assert not rx.when_fenced("t").done()  # nothing tells when those receives end: never
        finally:
            await rx.close()

    asyncio.run(scenario())


def test_a_cancel_that_could_not_drain_is_fenced_once_its_receives_complete():
    """With no time to drain, the cancel cannot promise its buffers; its receives complete a moment
    later (the 0-byte messages it sent itself), and when_fenced() says so: the blocks may be reused."""
    from pdserve.common.errors import InvalidRequestError
    from pdserve.common.kv.pool import KVPool
    from pdserve.common.transfer import UcxKVReceiver

    async def scenario():
        pool = KVPool(SPEC, 2)
        rx = UcxKVReceiver(drain_timeout=0.0)
        try:
            rx.expect("t", [pool.block(0), pool.block(1)])
            assert await rx.cancel("t") is False
            fence = rx.when_fenced("t")
            assert not fence.done()
            with pytest.raises(InvalidRequestError, match="not fenced"):  # its fence would be lost
                rx.expect("t", [pool.block(0)])
            await asyncio.wait_for(fence, 10)
            assert rx._parked == {} and rx.when_fenced("t").done()
        finally:
            await rx.close()

    asyncio.run(scenario())
