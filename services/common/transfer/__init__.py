"""KV data plane: moves KV blocks between workers (see base.py for the contract).

`UcxKVReceiver` / `UcxKVSender` (real transport) are loaded on first use, so
importing this package never imports ucxx; `LoopbackKVReceiver` /
`LoopbackKVSender` are the in-process stand-ins for unit tests.
"""

from __future__ import annotations

from pdserve.common.transfer.base import KVReceiver, KVSender, TransferStatus, TransferTicket, block_checksum
from pdserve.common.transfer.loopback import LoopbackKVReceiver, LoopbackKVSender

__all__ = [
    "KVReceiver",
    "KVSender",
    "LoopbackKVReceiver",
    "LoopbackKVSender",
    "TransferStatus",
    "TransferTicket",
    "UcxKVReceiver",
    "UcxKVSender",
    "block_checksum",
]


def __getattr__(name: str):
    if name in ("UcxKVReceiver", "UcxKVSender"):
        from pdserve.common.transfer import ucx

        return getattr(ucx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
