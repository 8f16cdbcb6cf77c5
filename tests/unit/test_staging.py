"""The staging contract of device blocks (transfer/staging.py), on any machine.

A StagedBlock pairs a device block with its host mirror; the transports only see
the mirrors. CPU tensors stand in for the device side here, through the loopback
transport, so CI checks the order of the copies; tests/gpu checks CUDA pools
over real UCX where a GPU is present.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdserve.common.errors import InvalidRequestError, TransferFailedError
from pdserve.common.kv.pool import KVPool
from pdserve.common.kv.spec import KVSpec
from pdserve.common.transfer import LoopbackKVReceiver, LoopbackKVSender, TransferStatus
from pdserve.common.transfer.staging import StagedBlock

SPEC = KVSpec("m", "d", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)


def _staged_pool(seed: int | None, spec: KVSpec = SPEC):
    """(device side, host mirror) of 4 blocks; the device side random if seeded."""
    device, host = KVPool(spec, 4).tensor, KVPool(spec, 4).tensor
    if seed is not None:
        device.copy_(torch.randn(device.shape, generator=torch.Generator().manual_seed(seed)))
    return device, host, [StagedBlock(device[i], host[i]) for i in range(4)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_a_staged_send_copies_out_first_and_the_receiver_copies_in_only_at_wait(dtype):
    spec = dataclasses.replace(SPEC, dtype=dtype)
    src_dev, src_host, src = _staged_pool(1, spec)
    dst_dev, dst_host, dst = _staged_pool(None, spec)
    rx, tx = LoopbackKVReceiver(), LoopbackKVSender()
    ticket = rx.expect("t", [dst[2], dst[0]])
    await tx.send(ticket, 0, [src[1], src[3]])
    assert torch.equal(src_host[1], src_dev[1]) and torch.equal(src_host[3], src_dev[3])  # copied out
    assert not src_host[0].any()  # only the blocks sent
    assert rx.status("t") is TransferStatus.DONE  # landed in the mirrors...
    assert torch.equal(dst_host[2], src_dev[1]) and not dst_dev.any()  # ...not yet on the device
    await rx.wait("t", 1)
    assert torch.equal(dst_dev[2], src_dev[1]) and torch.equal(dst_dev[0], src_dev[3])
    assert not dst_dev[1].any() and not dst_dev[3].any()


async def test_a_failed_transfer_never_reaches_the_device_blocks():
    _, _, src = _staged_pool(seed=2)
    dst_dev, dst_host, dst = _staged_pool(seed=None)
    rx, tx = LoopbackKVReceiver(), LoopbackKVSender(corrupt_blocks=frozenset({1}))
    ticket = rx.expect("t", dst[:2])
    await tx.send(ticket, 0, src[:2])  # as over UCX, the sender is not told
    with pytest.raises(TransferFailedError, match="checksum"):
        await rx.wait("t", 1)
    assert dst_host.any() and not dst_dev.any()  # the good block reached its mirror only


def test_a_bare_device_tensor_is_refused_by_name():
    meta = torch.empty(SPEC.block_shape, device="meta")  # a non-CPU tensor without a mirror
    with pytest.raises(InvalidRequestError, match="buffers.*host mirror"):
        LoopbackKVReceiver().expect("t", [meta])
