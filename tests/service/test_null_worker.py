"""The null engine behind a real router: what the control-plane benchmark stands on."""

from __future__ import annotations

import argparse
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from pdserve.bench import control_plane
from pdserve.bench.null_worker import NullWorker, NullWorkerConfig, fixed_tokens
from pdserve.client import AsyncClient, InvalidArgument
from pdserve.router.config import RouterConfig
from pdserve.router.serve import OTHER_RPCS, RouterRuntime, load_tokenizer
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from pdserve.v1 import router_pb2_grpc
from tests.polling import settles


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("")  # the router's tokenizer and context window; no weights


@contextlib.asynccontextmanager
async def null_suite(tokenizer, **router_kw):
    worker = NullWorker(NullWorkerConfig(port=0))
    await worker.start()
    config = RouterConfig(
        port=0,
        http_port=-1,
        metrics_port=-1,
        mode="colocated",
        decode_targets=[f"127.0.0.1:{worker.port}"],
        load_poll_s=0.2,
        **router_kw,
    )
    router = RouterRuntime(config, *tokenizer)
    await router.start(ready_timeout_s=10)
    try:
        yield router, worker
    finally:
        await router.stop()
        await worker.aclose()


async def test_a_request_through_the_router_returns_the_null_engines_fixed_tokens(tokenizer):
    async with null_suite(tokenizer) as (router, worker):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            request = rpb.GenerateRequest(
                token_ids=pb.TokenIds(ids=list(range(1000, 1020))), sampling=pb.SamplingParams(max_tokens=5)
            )
            tokens, text, last = [], "", None
            async for r in router_pb2_grpc.RouterStub(channel).Generate(request):
                tokens += r.token_ids
                text += r.text
                last = r
    assert tokens == fixed_tokens(5)
    assert text == " null engine token null engine"
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (20, 5)
    assert last.route.decode_worker_id == "null-0" and not last.route.disaggregated
    assert worker.servicer.completed == 1 and worker.servicer.running == 0


@pytest.mark.parametrize("max_tokens", [1, 3])
async def test_the_last_tokens_travel_in_the_final_message_not_one_after_it(tokenizer, max_tokens):
    # One message per token the worker sent: the finish, usage and timing ride on the last.
    async with null_suite(tokenizer) as (router, worker):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            request = rpb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[1000, 1001]), sampling=pb.SamplingParams(max_tokens=max_tokens)
            )
            messages = [r async for r in router_pb2_grpc.RouterStub(channel).Generate(request)]
    assert [list(m.token_ids) for m in messages] == [[t] for t in fixed_tokens(max_tokens)]
    assert [m.finish_reason for m in messages] == [pb.FINISH_REASON_UNSPECIFIED] * (max_tokens - 1) + [
        pb.FINISH_REASON_LENGTH
    ]
    assert messages[-1].usage.completion_tokens == max_tokens and messages[-1].timing.total_ms > 0
    assert "".join(m.text for m in messages) == {1: " null", 3: " null engine token"}[max_tokens]


async def test_the_sdk_records_genai_client_metrics_for_finished_and_failed_calls(tokenizer):
    reader = InMemoryMetricReader()
    async with null_suite(tokenizer) as (router, worker):
        async with AsyncClient(
            f"127.0.0.1:{router.port}", meter_provider=MeterProvider(metric_readers=[reader])
        ) as client:
            await client.complete([1000, 1001, 1002], max_tokens=4)
            with pytest.raises(InvalidArgument):
                await client.complete([1000], max_tokens=4, model="no-such-model")
    points = {
        m.name: m.data.data_points
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {p.attributes["gen_ai.token.type"]: p.sum for p in points["gen_ai.client.token.usage"]} == {
        "input": 3,
        "output": 4,
    }
    durations = {p.attributes.get("error.type"): p for p in points["gen_ai.client.operation.duration"]}
    assert set(durations) == {None, "invalid_argument"} and all(p.count == 1 for p in durations.values())
    assert durations[None].attributes == {
        "gen_ai.operation.name": "text_completion",
        "server.address": "127.0.0.1",
        "server.port": router.port,
    }
    assert durations["invalid_argument"].attributes["gen_ai.request.model"] == "no-such-model"


async def test_control_plane_measurement_reports_added_latency_and_rates(tokenizer):
    # The measurement's shape, and every request answered: how many req/s this machine sustains
    # is the benchmark's to report (`pdserve bench control-plane`), not a test's to assert.
    args = argparse.Namespace(
        prompt_tokens=8,
        latency_max_tokens=[2],
        reps=6,
        load_max_tokens=[2],
        concurrency=[2],
        rates=[40.0],
        duration=0.5,
        max_p99_ms=10_000.0,
    )
    async with null_suite(tokenizer) as (router, worker):
        out = await control_plane.measure(f"127.0.0.1:{router.port}", f"127.0.0.1:{worker.port}", args, pids={})
    latency = out["added_latency"]["2"]
    assert all(
        latency[path]["errors"] == 0 and latency[path]["e2e_ms"]["p50"] > 0
        for path in ("direct", "router", "router_sdk")
    )
    assert latency["added_e2e_ms_p50"] == pytest.approx(
        latency["router"]["e2e_ms"]["p50"] - latency["direct"]["e2e_ms"]["p50"]
    )
    assert {(r["path"], r["concurrency"]) for r in out["closed_loop"]} == {("direct", 2), ("router", 2)}
    assert all(r["achieved_rps"] > 0 and not r["errors"] for r in out["closed_loop"])
    (swept,) = out["open_loop"]
    assert swept["completed"] == swept["requests"] > 0 and not swept["errors"]
    assert swept["achieved_rps"] > 0 and isinstance(swept["sustained"], bool)  # the verdict is reported


async def test_calls_past_the_routers_bound_are_refused_with_resource_exhausted(tokenizer):
    # Health watches are open to anyone: without a bound on calls, each would hold memory for good.
    async with null_suite(tokenizer, max_inflight=1) as (router, worker):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(1 + OTHER_RPCS)]
            for w in watches:
                await w.read()  # each is open: its first status came
            request = rpb.GenerateRequest(token_ids=pb.TokenIds(ids=[1000]), sampling=pb.SamplingParams(max_tokens=1))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                [r async for r in router_pb2_grpc.RouterStub(channel).Generate(request)]
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            for w in watches:
                w.cancel()
            assert await settles(lambda: len([1 for w in watches if w.done()]) == len(watches))
            [r async for r in router_pb2_grpc.RouterStub(channel).Generate(request)]  # served again
