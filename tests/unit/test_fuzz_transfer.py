"""Property-based fuzzing of the KV transfer layer's receiving side.

Whatever arrives (headers of any bytes, a ticket forged, replayed or
cancelled, block indices beyond the ticket, blocks of the wrong size, flipped
data), the receiver raises nothing but TransferFailedError, writes nowhere
outside the destination blocks of a ticket whose secret the sender held,
reports DONE only when every block is the sender's intact data, and forgets
every transfer once cancelled. Driven through the loopback transport at the
message level (`_deliver`: one block's arrival, as UCX would hand it over) and
through real UCX with a sender that holds the secret but sends garbage.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.common.errors import InvalidRequestError, TransferFailedError
from pdserve.common.kv.pool import KVPool
from pdserve.common.kv.spec import KVSpec
from pdserve.common.transfer import LoopbackKVReceiver, LoopbackKVSender, TransferStatus, block_checksum
from pdserve.common.transfer.base import HEADER, HEADER_BYTES, block_tag, make_header, verify_block

SPEC = KVSpec("m", "d", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
BLOCK_BYTES = SPEC.block_bytes
CANARY = 7.0  # what every destination block holds before anything lands
TICKETS = {"a": [5, 1, 6], "b": [2, 3], "gone": [0]}  # destination pool blocks; "gone" is cancelled at once
OUTSIDE = [0, 4, 7]  # in no live ticket: must never change
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _source() -> KVPool:
    torch.manual_seed(0)
    src = KVPool(SPEC, 8)
    src.tensor.copy_(torch.randn_like(src.tensor))
    return src


SRC = _source()


# ---- verify_block alone ---------------------------------------------------------
def _ticket(transfer_id: str = "t1", secret: bytes = b"s" * 32):
    rx = LoopbackKVReceiver()
    t = rx.expect(transfer_id, [torch.zeros(BLOCK_BYTES // 4)])
    return dataclasses.replace(t, secret=secret)


TICKET = _ticket()
DATA = SRC.block(0)
GENUINE = bytes(make_header(TICKET, 0, BLOCK_BYTES, block_checksum(DATA)))
SIGNED = HEADER.size + 16  # bytes the MAC covers, and the MAC; the rest is padding


@FUZZ
@given(st.binary(max_size=2 * HEADER_BYTES))
def test_any_header_bytes_are_answered_never_raised_and_only_the_genuine_one_passes(header):
    verdict = verify_block(TICKET, 0, header, DATA)
    assert verdict is None if header[:SIGNED] == GENUINE[:SIGNED] else isinstance(verdict, str)


@FUZZ
@given(st.integers(0, SIGNED - 1), st.integers(1, 255))
def test_every_flipped_header_byte_is_rejected(position, mask):
    header = bytearray(GENUINE)
    header[position] ^= mask
    assert verify_block(TICKET, 0, header, DATA) is not None


@FUZZ
@given(st.text(max_size=12), st.binary(min_size=1, max_size=40), st.integers(-2, 4))
def test_a_header_is_bound_to_its_ticket_and_index(transfer_id, secret, index):
    other = dataclasses.replace(TICKET, transfer_id=transfer_id, secret=secret)
    same = (transfer_id, secret, index) == (TICKET.transfer_id, TICKET.secret, 0)
    assert (verify_block(other, index, GENUINE, DATA) is None) == same


# ---- the loopback receiver, message by message -----------------------------------
message = st.fixed_dictionaries(
    {
        "ticket": st.sampled_from(sorted(TICKETS)),
        "forge": st.sampled_from(["none", "secret", "transfer_id"]),
        "index": st.integers(-2, 4),
        "size": st.sampled_from([BLOCK_BYTES, BLOCK_BYTES, BLOCK_BYTES - 4, BLOCK_BYTES + 4, 0]),
        "header": st.one_of(
            st.sampled_from(["genuine", "genuine", "other index", "flipped"]), st.binary(max_size=HEADER_BYTES + 8)
        ),
        "data": st.sampled_from(["genuine", "genuine", "flipped"]),
    }
)
send = st.fixed_dictionaries(
    {  # the sender API, with arguments out of range
        "ticket": st.sampled_from(sorted(TICKETS)),
        "first": st.integers(-1, 4),
        "count": st.integers(0, 3),
        "size": st.sampled_from([BLOCK_BYTES, BLOCK_BYTES - 4]),
    }
)


def _arrival(tickets: dict, m: dict) -> tuple:
    """The arguments of one block's arrival (`_deliver`) that message `m` describes."""
    ticket, i = tickets[m["ticket"]], m["index"]
    if m["forge"] == "secret":
        ticket = dataclasses.replace(ticket, secret=bytes(32))
    elif m["forge"] == "transfer_id":  # another transfer's id with this one's secret
        ticket = dataclasses.replace(ticket, transfer_id="b" if m["ticket"] == "a" else "a")
    genuine = SRC.block(i % 8)  # what the sender computed its header over
    data = genuine.clone()
    if m["data"] == "flipped":
        data.reshape(-1).view(torch.uint8)[3] ^= 0x10
    data = _as_size(data, m["size"])
    real, wire_index = tickets[m["ticket"]], i % 2**32  # the header's index field is a uint32
    if m["header"] == "genuine":
        header = make_header(real, wire_index, BLOCK_BYTES, block_checksum(genuine))
    elif m["header"] == "other index":
        header = make_header(real, (i + 1) % 2**32, BLOCK_BYTES, block_checksum(genuine))
    elif m["header"] == "flipped":
        header = make_header(real, wire_index, BLOCK_BYTES, block_checksum(genuine))
        header[9] ^= 1  # the index field
    else:
        header = m["header"]
    return ticket, i, bytes(header), data


def _as_size(block: torch.Tensor, size: int) -> torch.Tensor:
    """The block's bytes, cut or zero-padded to `size`."""
    raw = block.reshape(-1).view(torch.uint8)
    return (
        raw[:size].clone()
        if size <= raw.numel()
        else torch.cat([raw, torch.zeros(size - raw.numel(), dtype=torch.uint8)])
    )


def _intact(dst: KVPool, blocks: list[int]) -> bool:
    return all(dst.block(b).equal(SRC.block(i)) for i, b in enumerate(blocks))


@FUZZ
@given(st.lists(st.one_of(message.map(lambda m: ("message", m)), send.map(lambda s: ("send", s))), max_size=24))
def test_whatever_arrives_only_the_tickets_own_blocks_change_and_done_means_intact(steps):
    async def scenario():
        dst = KVPool(SPEC, 8)
        dst.tensor.fill_(CANARY)
        rx, tx = LoopbackKVReceiver(), LoopbackKVSender()
        tickets = {tid: rx.expect(tid, [dst.block(b) for b in blocks]) for tid, blocks in TICKETS.items()}
        await rx.cancel("gone")
        for kind, step in steps:
            before = dst.tensor.clone()
            statuses = {tid: rx.status(tid) for tid in ("a", "b")}
            try:
                if kind == "message":
                    ticket, i, header, data = _arrival(tickets, step)
                    rx._deliver(ticket, i, header, data, corrupt=False)
                else:
                    indices = range(step["first"], step["first"] + step["count"])
                    buffers = [_as_size(SRC.block(k % 8), step["size"]) for k in indices]
                    await tx.send(tickets[step["ticket"]], step["first"], buffers)
            except InvalidRequestError:
                assert kind == "send"  # the sender's own argument checks; nothing went out
                assert dst.tensor.equal(before)
            except TransferFailedError:
                pass
            changed = {b for b in range(8) if not dst.block(b).equal(before[b])}
            live = {b for tid in ("a", "b") if statuses[tid] is not TransferStatus.FAILED for b in TICKETS[tid]}
            assert changed <= live, f"blocks {changed - live} written outside a live ticket"
            if kind == "message" and step["forge"] != "none" or step["ticket"] == "gone":
                assert not changed  # no secret of that ticket, or the ticket is gone: nothing lands
            for tid, status in statuses.items():
                now = rx.status(tid)
                if status is TransferStatus.FAILED:
                    assert now is TransferStatus.FAILED  # a failure is final
                if now is TransferStatus.DONE:
                    assert _intact(dst, TICKETS[tid])
        for b in OUTSIDE:
            assert (dst.block(b) == CANARY).all()
        for tid in ("a", "b"):
            assert await rx.cancel(tid) is True
        assert rx._transfers == {}  # nothing left behind
        await rx.close()

    asyncio.run(scenario())


async def test_a_replayed_block_cannot_complete_a_transfer_in_place_of_a_missing_one():
    dst = KVPool(SPEC, 8)
    rx = LoopbackKVReceiver()
    ticket = rx.expect("r1", [dst.block(0), dst.block(1)])
    header = make_header(ticket, 0, BLOCK_BYTES, block_checksum(SRC.block(0)))
    rx._deliver(ticket, 0, header, SRC.block(0), corrupt=False)
    with pytest.raises(TransferFailedError, match="no receive for block 0"):
        rx._deliver(ticket, 0, header, SRC.block(0), corrupt=False)
    assert rx.status("r1") is TransferStatus.TRANSFERRING  # block 1 never came


# ---- real UCX, a sender that holds the secret but sends garbage ------------------
ucx_message = st.fixed_dictionaries(
    {
        "header": st.one_of(st.just("genuine"), st.just("none"), st.binary(min_size=0, max_size=HEADER_BYTES * 2)),
        "data": st.sampled_from(["genuine", "flipped", "short", "long", "none"]),
    }
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ucx_message, min_size=2, max_size=2))
def test_ucx_receiver_survives_garbage_from_a_sender_with_the_secret(blocks):
    from pdserve.common.transfer import UcxKVReceiver, ucx

    async def scenario():
        dst = KVPool(SPEC, 4)
        dst.tensor.fill_(CANARY)
        rx, w = UcxKVReceiver(drain_timeout=5), ucx._Worker()
        ep = w.endpoint(rx.address)
        try:
            ticket = rx.expect("r1", [dst.block(2), dst.block(0)])
            reqs, keep = [], []
            for i, b in enumerate(blocks):
                genuine = SRC.block(i).view(torch.uint8).reshape(-1).numpy()
                data = {
                    "genuine": genuine,
                    "flipped": genuine ^ np.uint8(1),
                    "short": genuine[:100].copy(),
                    "long": np.concatenate([genuine, genuine[:64]]),
                    "none": None,
                }[b["data"]]
                header = (
                    np.frombuffer(bytes(make_header(ticket, i, BLOCK_BYTES, block_checksum(genuine))), np.uint8)
                    if b["header"] == "genuine"
                    else None
                    if b["header"] == "none"
                    else np.frombuffer(b["header"], np.uint8).copy()
                )
                for kind, payload in ((b"D", data), (b"H", header)):
                    if payload is not None:
                        keep.append(payload)
                        reqs.append(ep.tag_send(w.Array(payload), w.tag(block_tag(ticket, kind, i))))
            if reqs:
                await asyncio.wait_for(asyncio.shield(w.watch(reqs).future), 5)
            complete = all(b["header"] != "none" and b["data"] != "none" for b in blocks)
            for _ in range(200):  # let the receiver notice what landed
                if not complete or rx.status("r1") in (TransferStatus.DONE, TransferStatus.FAILED):
                    break
                await asyncio.sleep(0.005)
            status = rx.status("r1")
            genuine_all = all(b == {"header": "genuine", "data": "genuine"} for b in blocks)
            if complete:
                assert status is (TransferStatus.DONE if genuine_all else TransferStatus.FAILED)
            else:
                assert status is not TransferStatus.DONE
            if status is TransferStatus.DONE:
                assert _intact(dst, [2, 0])
            assert (dst.block(1) == CANARY).all() and (dst.block(3) == CANARY).all()
            assert await rx.cancel("r1") is True  # every posted receive drained
            assert rx._transfers == {} and rx._groups == {} and rx._parked == {}
        finally:
            w.close_endpoint(ep)
            await w.close()
            await rx.close()

    asyncio.run(scenario())
