"""The KV receiver and sender of the transport a service's config names.

Every service that moves KV (prefill, decode, the KV store) builds its ends
here; importing this module loads neither torch nor ucxx.
"""

from __future__ import annotations

from pdserve.common.transfer.base import KVReceiver, KVSender
from pdserve.common.transfer.loopback import LoopbackKVReceiver, LoopbackKVSender
from pdserve.common.transfer.netdev import data_host


def make_receiver(config) -> KVReceiver:
    """Over UCX it listens on the data host's interfaces only."""
    if config.transport == "ucx":
        from pdserve.common.transfer.ucx import UcxKVReceiver

        return UcxKVReceiver(host=data_host(config))
    return LoopbackKVReceiver()


def make_sender(config) -> KVSender:
    if config.transport == "ucx":
        from pdserve.common.transfer.ucx import UcxKVSender

        return UcxKVSender(host=data_host(config))
    return LoopbackKVSender()
