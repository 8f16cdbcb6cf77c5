"""One virtual network and one suite for the whole directory (starting four model
workers is the slow part); skipped where network namespaces cannot be made."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from pdserve.launcher import Suite
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import decode_pb2_grpc, prefill_pb2_grpc, router_pb2_grpc
from pdserve.v1 import router_pb2 as rpb
from tests.multihost import netns
from tests.multihost.netns import Network
from tests.multihost.suite import names, netns_suite

PREFILL, DECODE = 2, 2
# A prefill cut off the network stalls (no reset comes back): the router gives
# up on it after this long and retries elsewhere. Long enough for a slow
# prefill on a busy machine, short enough for the test.
PREFILL_TIMEOUT_S = 15


@dataclass
class Cluster:
    net: Network
    suite: Suite

    def names(self, role: str) -> list[str]:
        """The services of a role whose host (namespace) still has a process."""
        return [n for n in self.net.address if n.startswith(role) and self.net.pids(n)]

    def address(self, name: str) -> str:
        return next(s.address for s in self.suite.services if s.name == name)

    async def decode_stats(self, name: str) -> dpb.GetDecodeStatsResponse:
        async with grpc.aio.insecure_channel(self.address(name)) as ch:
            return await decode_pb2_grpc.DecodeStub(ch).GetStats(dpb.GetDecodeStatsRequest(), timeout=10)

    async def load(self, name: str) -> pb.WorkerLoad:
        stub = prefill_pb2_grpc.PrefillStub if name.startswith("prefill") else decode_pb2_grpc.DecodeStub
        async with grpc.aio.insecure_channel(self.address(name)) as ch:
            return (await stub(ch).GetLoad(pb.GetLoadRequest(), timeout=2)).load

    async def healthy(self) -> dict[str, bool]:
        """The router's view: worker id -> healthy."""
        async with grpc.aio.insecure_channel(self.suite.router_target) as ch:
            r = await router_pb2_grpc.RouterStub(ch).ListWorkers(rpb.ListWorkersRequest(), timeout=10)
        return {w.info.worker_id: w.healthy for w in r.workers}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if why := netns.unavailable():
        pytest.skip(f"multi-host test needs network namespaces: {why}")
    with Network(names(PREFILL, DECODE)) as net:
        env = {
            "PDSERVE_PREFILL_TIMEOUT_S": str(PREFILL_TIMEOUT_S),
            # Six processes on a couple of cores: one compute thread each, not six times all cores.
            "OMP_NUM_THREADS": "1",
            # Draining on SIGTERM is not under test here (tests/e2e has it): a short teardown.
            "PDSERVE_GRACE_S": "3",
        }
        # float32: a migrated stream must match an unfaulted one token for token, and in
        # bfloat16 a re-prefill rounds unlike the decode steps it replaces (docs/engine.md, Precision).
        suite = netns_suite(
            net,
            PREFILL,
            DECODE,
            env=env,
            dtype="float32",
            log_dir=tmp_path_factory.mktemp("multihost-logs"),
            ready_timeout=420,
        )
        suite.start()
        try:
            yield Cluster(net, suite)
        finally:
            suite.stop()
