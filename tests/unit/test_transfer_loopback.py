"""The transfer contract (base.py) through the in-process loopback transport."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from pdserve.common.errors import InvalidRequestError, NotFoundError, TransferFailedError, TransferTimeoutError
from pdserve.common.kv.pool import KVPool
from pdserve.common.kv.spec import KVSpec
from pdserve.common.transfer import LoopbackKVReceiver, LoopbackKVSender, TransferStatus, block_checksum
from pdserve.common.transfer.base import HEADER_BYTES, block_tag, make_header, verify_block

SPEC = KVSpec("m", "d", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)


@pytest.fixture
def pools():
    torch.manual_seed(0)
    src = KVPool(SPEC, 8)
    src.tensor.copy_(torch.randn_like(src.tensor))
    return src, KVPool(SPEC, 8)


def test_importing_the_package_does_not_import_ucxx_or_torch():
    code = (
        "import sys, pdserve.common.transfer as t; t.LoopbackKVReceiver; t.UcxKVSender;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ucxx', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_blocks_arrive_chunk_by_chunk_and_verify(pools):
    src, dst = pools
    rx, tx = LoopbackKVReceiver(), LoopbackKVSender()
    ticket = rx.expect("r1", [dst.block(b) for b in (5, 1, 6)])
    assert (ticket.num_blocks, ticket.block_bytes, ticket.address) == (3, SPEC.block_bytes, rx.address)
    assert len(ticket.secret) >= 16 and "secret" not in repr(ticket)
    assert rx.status("r1") is TransferStatus.PENDING
    await tx.send(ticket, 0, [src.block(0), src.block(1)])
    assert rx.status("r1") is TransferStatus.TRANSFERRING
    await tx.send(ticket, 2, [src.block(2)])
    await rx.wait("r1", timeout=1)
    assert rx.status("r1") is TransferStatus.DONE
    for i, b in enumerate((5, 1, 6)):
        assert dst.block(b).equal(src.block(i))
    assert not dst.tensor[[0, 2, 3, 4, 7]].any()
    assert await rx.cancel("r1") is True
    with pytest.raises(NotFoundError):
        rx.status("r1")


async def test_wrong_secret_is_refused_and_nothing_lands(pools):
    src, dst = pools
    rx, tx = LoopbackKVReceiver(), LoopbackKVSender()
    ticket = rx.expect("r1", [dst.block(0)])
    with pytest.raises(TransferFailedError):
        await tx.send(dataclasses.replace(ticket, secret=b"x" * 32), 0, [src.block(0)])
    assert not dst.tensor.any() and rx.status("r1") is TransferStatus.PENDING


async def test_corrupted_block_fails_the_transfer(pools):
    src, dst = pools
    rx, tx = LoopbackKVReceiver(), LoopbackKVSender(corrupt_blocks=frozenset({1}))
    ticket = rx.expect("r1", [dst.block(0), dst.block(1)])
    await tx.send(ticket, 0, [src.block(0), src.block(1)])
    assert rx.status("r1") is TransferStatus.FAILED
    with pytest.raises(TransferFailedError, match="checksum mismatch"):
        await rx.wait("r1", timeout=1)


async def test_wait_times_out_without_changing_state(pools):
    rx = LoopbackKVReceiver()
    rx.expect("r1", [pools[1].block(0)])
    with pytest.raises(TransferTimeoutError):
        await rx.wait("r1", timeout=0.05)
    assert rx.status("r1") is TransferStatus.PENDING


async def test_cancel_frees_and_late_data_is_refused(pools):
    src, dst = pools
    rx, tx = LoopbackKVReceiver(), LoopbackKVSender()
    ticket = rx.expect("r1", [dst.block(0), dst.block(1)])
    await tx.send(ticket, 0, [src.block(0)])
    assert await rx.cancel("r1") is True
    dst.tensor.zero_()
    rx.expect("r2", [dst.block(0), dst.block(1)])  # the same blocks, reused
    with pytest.raises(TransferFailedError):
        await tx.send(ticket, 1, [src.block(1)])
    assert not dst.tensor.any()
    assert await rx.cancel("unknown") is True


async def test_misuse_is_rejected(pools):
    src, dst = pools
    rx, tx = LoopbackKVReceiver(), LoopbackKVSender()
    ticket = rx.expect("r1", [dst.block(0)])
    with pytest.raises(InvalidRequestError):
        rx.expect("r1", [dst.block(1)])  # id already in use
    with pytest.raises(InvalidRequestError):
        rx.expect("r2", [])
    with pytest.raises(InvalidRequestError):
        rx.expect("r3", [dst.tensor[:, 0]])  # not contiguous
    with pytest.raises(InvalidRequestError):
        await tx.send(ticket, 1, [src.block(0)])  # index beyond the ticket
    with pytest.raises(InvalidRequestError):
        await tx.send(ticket, 0, [src.block(0)[0]])  # wrong size
    with pytest.raises(NotFoundError):
        await rx.wait("nope", 1)
    await rx.close()
    with pytest.raises(TransferFailedError):
        await tx.send(ticket, 0, [src.block(0)])


def test_checksum_sees_small_changes_and_moves():
    a = torch.randn(737_280 // 4)
    ref = block_checksum(a)
    assert len(ref) == 16 and block_checksum(a.clone()) == ref
    b = a.clone()
    b.view(torch.int32)[12345] ^= 1  # one bit
    assert block_checksum(b) != ref
    c = a.clone()
    c[:1024], c[1024:2048] = a[1024:2048].clone(), a[:1024].clone()  # two 4 KiB pages swapped
    assert block_checksum(c) != ref
    d = a.clone()
    d.view(torch.int64)[7] += 1 << 20
    d.view(torch.int64)[70_000] -= 1 << 20  # two errors that cancel in a plain sum
    assert block_checksum(d) != ref
    assert block_checksum(torch.zeros(1000)) != block_checksum(torch.zeros(1001))  # size counts via tail
    odd = np.arange(5003, dtype=np.uint8)  # sizes not a multiple of 4096 or 8 work too
    assert block_checksum(odd) != block_checksum(odd[::-1].copy())


def test_tags_and_header_are_keyed_by_the_secret():
    rx = LoopbackKVReceiver()
    t = rx.expect("r1", [torch.zeros(16)])
    other = dataclasses.replace(t, secret=b"y" * 32)
    assert block_tag(t, b"D", 0) != block_tag(other, b"D", 0)
    assert block_tag(t, b"D", 0) != block_tag(t, b"D", 1) != block_tag(t, b"H", 1)
    data = torch.ones(16)
    header = make_header(t, 0, data.nbytes, block_checksum(data))
    assert len(header) == HEADER_BYTES and verify_block(t, 0, header, data) is None
    assert "MAC" in verify_block(other, 0, header, data)
    assert "does not match" in verify_block(t, 1, make_header(t, 1, 8, block_checksum(data)), data)
