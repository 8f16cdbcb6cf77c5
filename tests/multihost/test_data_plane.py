"""The KV data plane alone (pdserve's UCX transport, no model) between two
network namespaces: a sender whose link goes down and comes back reaches its
receiver again.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading

import pytest

from tests.multihost import netns
from tests.multihost.netns import Network
from tests.multihost.suite import ENV
from tests.multihost.ucx_peer import MARK

pytestmark = pytest.mark.multihost


class Peer:
    """A tests.multihost.ucx_peer process inside one namespace."""

    def __init__(self, net: Network, name: str, role: str) -> None:
        self.proc = subprocess.Popen(
            [*net.exec_prefix(name), sys.executable, "-m", "tests.multihost.ucx_peer", role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **ENV, "OMP_NUM_THREADS": "1"},
        )
        self.replies: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.hello = self._reply(120)  # importing torch and starting UCX, on a busy machine

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK) :]))

    def _reply(self, timeout: float):
        try:
            r = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply within {timeout:g}s") from None
        if "error" in r:
            raise RuntimeError(r["error"])
        return r["ok"]

    def __call__(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply(120)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def net():
    if why := netns.unavailable():
        pytest.skip(f"needs network namespaces: {why}")
    with Network(["decode", "prefill"]) as network:
        yield network


@pytest.fixture(scope="module")
def receiver(net):
    peer = Peer(net, "decode", "recv")
    yield peer
    peer.close()


@pytest.fixture
def sender(net):
    peer = Peer(net, "prefill", "send")  # a fresh process: what UCX remembers is per process
    yield peer
    peer.close()
    net.set_link("prefill", up=True)


def transfer(receiver: Peer, sender: Peer, tid: str, seed: int, seconds: float = 20) -> dict:
    """One verified transfer of the peers' blocks; its ticket."""
    ticket = receiver(expect=tid)
    sender(send=ticket, seed=seed, seconds=seconds)
    assert receiver(wait=tid, seconds=seconds) == "DONE"
    assert receiver(check=seed) is True
    return ticket


def test_kv_transfer_resumes_after_a_link_flap(net, receiver, sender):
    transfer(receiver, sender, "flap-1", seed=1)
    before = net.counters("decode")["rx_bytes"]
    ticket = transfer(receiver, sender, "flap-2", seed=2)
    assert net.counters("decode")["rx_bytes"] - before >= ticket["num_blocks"] * ticket["block_bytes"]
    net.set_link("prefill", up=False)
    with pytest.raises(RuntimeError, match="Transfer"):  # fails or times out; never hangs
        transfer(receiver, sender, "flap-3", seed=3, seconds=3)
    net.set_link("prefill", up=True)
    transfer(receiver, sender, "flap-4", seed=4)


def test_kv_transfer_works_after_an_outage_at_the_first_transfer(net, receiver, sender):
    # libucx reads the routing table once per process, at its first reachability check:
    # our UCX worker checks at start, so a first transfer during an outage is not that check.
    net.set_link("prefill", up=False)
    with pytest.raises(RuntimeError, match="Transfer"):
        transfer(receiver, sender, "cold-1", seed=5, seconds=3)
    net.set_link("prefill", up=True)
    transfer(receiver, sender, "cold-2", seed=6)
