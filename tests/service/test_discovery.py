"""Worker discovery by DNS: a `dns:NAME:PORT` target is every address NAME resolves to,
looked up again at each load poll (a headless Kubernetes Service lists its pods).

Real router and real (null-engine) workers on 127.0.0.1 and 127.0.0.2, one port;
only name resolution is scripted, as a cluster's DNS would answer while a
StatefulSet scales up, scales down, or DNS fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import pytest

from pdserve.bench.null_worker import NullWorker, NullWorkerConfig
from pdserve.router.config import RouterConfig
from pdserve.router.serve import RouterRuntime, load_tokenizer
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from pdserve.v1 import router_pb2_grpc

NAME = "decode.pdserve.test"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("")


@pytest.fixture
def dns(monkeypatch):
    """NAME's addresses, as the test sets them; a list, or an OSError to raise (counted in "failed")."""
    answer: dict[str, object] = {"addresses": [], "failed": 0}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != NAME:
            return real(host, port, *args, **kwargs)
        if isinstance(answer["addresses"], OSError):
            answer["failed"] += 1
            raise answer["addresses"]
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, int(port), 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(port)))
            for a in answer["addresses"]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answer


@contextlib.asynccontextmanager
async def two_workers_on_one_port(ids: tuple[str, str] = ("null-a", "null-b")):
    a = NullWorker(NullWorkerConfig(host="127.0.0.1", port=0, worker_id=ids[0]))
    await a.start()
    b = NullWorker(NullWorkerConfig(host="127.0.0.2", port=a.port, worker_id=ids[1]))
    await b.start()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@contextlib.asynccontextmanager
async def router_to(tokenizer, *decode_targets: str):
    """A started colocated router polling its decode targets every 0.1 s."""
    config = RouterConfig(
        port=0, http_port=-1, metrics_port=-1, mode="colocated", load_poll_s=0.1, decode_targets=list(decode_targets)
    )
    router = RouterRuntime(config, *tokenizer)
    await router.start(ready_timeout_s=10)
    try:
        yield router
    finally:
        await router.stop()


async def generate(stub, n: int) -> None:
    """n requests of distinct 32-token prompts (distinct prefixes spread over equal workers)."""
    for i in range(n):
        prompt = [1000 + 100 * (i % 50) + j for j in range(32)]
        async for _ in stub.Generate(
            rpb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(max_tokens=2))
        ):
            pass


async def until(predicate, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_workers_join_and_leave_as_the_name_resolves_to_them(tokenizer, dns):
    async with two_workers_on_one_port() as (a, b):
        dns["addresses"] = ["127.0.0.1"]
        async with router_to(tokenizer, f"dns:{NAME}:{a.port}") as router:
            pool = router.router.pool
            async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                assert [w.target for w in pool.decode] == [f"127.0.0.1:{a.port}"]
                await generate(stub, 2)

                dns["addresses"] = ["127.0.0.1", "127.0.0.2"]  # scaled up
                await until(lambda: sum(w.healthy for w in pool.decode) == 2)
                await generate(stub, 8)
                assert a.servicer.completed > 2 and b.servicer.completed > 0  # both serve

                dns["addresses"] = OSError("DNS down")  # a failed lookup keeps the workers
                await until(lambda: dns["failed"] >= 2)  # the next lookup failed, and another after it
                assert len(pool.decode) == 2

                dns["addresses"] = ["127.0.0.2"]  # scaled down: a leaves
                await until(lambda: [w.target for w in pool.decode] == [f"127.0.0.2:{a.port}"])
                served_by_a = a.servicer.completed
                await generate(stub, 3)
                assert a.servicer.completed == served_by_a and b.servicer.completed >= 3


async def test_a_dual_stack_answer_is_one_worker_per_pod_not_two(tokenizer, dns):
    async with two_workers_on_one_port() as (a, b):
        dns["addresses"] = ["127.0.0.1", "::1"]  # the same pod's A and AAAA records
        async with router_to(tokenizer, f"dns:{NAME}:{a.port}") as router:
            assert [w.target for w in router.router.pool.decode] == [f"127.0.0.1:{a.port}"]


@pytest.mark.parametrize("target", ["dns:decode-without-port", "dns:///decode:50061"])
def test_a_malformed_dns_target_is_refused_at_startup(target):
    with pytest.raises(ValueError, match="dns:NAME:PORT"):
        RouterConfig(decode_targets=[target]).validate()


async def test_a_worker_reached_by_two_routes_is_routed_to_once(tokenizer, dns):
    async with two_workers_on_one_port() as (a, b):
        dns["addresses"] = ["127.0.0.1", "127.0.0.2"]
        # a is both a static target and one of the name's addresses: three routes, two workers.
        async with router_to(tokenizer, f"127.0.0.1:{a.port}", f"dns:{NAME}:{a.port}") as router:
            pool = router.router.pool
            await until(lambda: sum(w.healthy for w in pool.decode) == 3)
            assert sorted(w.worker_id for w in pool.decode if w.routable) == ["null-a", "null-b"]
            twins = [w for w in pool.decode if w.twin]  # the static route came first and is kept
            assert [(w.target, w.discovered_by) for w in twins] == [(f"127.0.0.1:{a.port}", f"dns:{NAME}:{a.port}")]


async def test_two_workers_that_share_a_worker_id_are_not_taken_for_one(tokenizer, dns):
    # A copied config that kept its worker id: still two processes, both serve.
    async with two_workers_on_one_port(ids=("decode-0", "decode-0")) as (a, b):
        dns["addresses"] = ["127.0.0.1", "127.0.0.2"]
        async with router_to(tokenizer, f"dns:{NAME}:{a.port}") as router:
            pool = router.router.pool
            await until(lambda: sum(w.healthy for w in pool.decode) == 2)
            assert [w.twin for w in pool.decode] == [False, False]
