"""One request, one trace: W3C trace context carried through gRPC metadata from
the client SDK to the router, prefill, decode and the KV store, in one process
(services told apart by the `pdserve.service` attribute they set)."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pdserve.client import AsyncClient
from pdserve.common import grpc_tracing, security, tracing
from pdserve.kvstore import serve as kvstore_serve
from pdserve.kvstore.config import KVStoreConfig
from pdserve.router.models import served_models
from pdserve.v1 import kvstore_pb2 as kpb
from pdserve.v1 import kvstore_pb2_grpc
from tests.engine.prompts import text_of_tokens
from tests.service.suite import inprocess_suite

TIMING = ("queued_ms", "prefill_ms", "ttft_ms", "decode_ms", "total_ms")


def _named(spans, name, kind=None):
    return [s for s in spans if s.name == name and (kind is None or s.kind == kind)]


async def _until(condition, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for spans"
        await asyncio.sleep(0.05)


def _ancestors(span, by_id):
    out = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        out.append(span)
    return out


@pytest.fixture
def exporter():
    spans = InMemorySpanExporter()
    provider = TracerProvider()  # the SDK's default sampler: the parent's decision, else always
    provider.add_span_processor(SimpleSpanProcessor(spans))
    with tracing.installed(provider):
        yield spans


async def test_one_request_is_one_trace_through_router_prefill_decode_and_kvstore(smollm2, exporter):
    _, _, tokenizer = smollm2
    prompt = text_of_tokens(tokenizer, 200)  # two prefill chunks of at most 128 tokens, 12 full blocks
    async with inprocess_suite(smollm2, store_blocks=64) as suite:
        async with AsyncClient(f"127.0.0.1:{suite.router.port}") as client:
            with tracing.tracer("test").start_as_current_span("test.client") as root:
                completion = await client.complete(prompt, max_tokens=6, temperature=0.0, request_id="traced-1")
        (model,) = served_models(suite.router.router.pool)
        # The prefill worker offers its blocks to the store after answering.
        await _until(lambda: _named(exporter.get_finished_spans(), "pdserve.v1.KVStore/CommitWrite", SpanKind.SERVER))
    spans = exporter.get_finished_spans()
    trace_id = root.get_span_context().trace_id

    # Every call any service served belongs to this request's trace: a hop that
    # lost the context would have started a trace of its own.
    served = [s for s in spans if s.kind == SpanKind.SERVER]
    assert {s.context.trace_id for s in served} == {trace_id}
    trace = [s for s in spans if s.context.trace_id == trace_id]
    assert {"router", "prefill", "decode", "kvstore"} <= {s.attributes.get("pdserve.service") for s in trace}

    # One tree: every span's parent is in it, down from the client's span.
    by_id = {s.context.span_id: s for s in trace}
    assert [s.name for s in trace if s.parent is None] == ["test.client"]
    assert all(s.parent.span_id in by_id for s in trace if s.parent is not None)

    # Each server span is the child of the client span of the call that reached it.
    for s in served:
        caller = by_id[s.parent.span_id]
        assert (caller.kind, caller.name) == (SpanKind.CLIENT, s.name)
    (generate,) = _named(trace, "router.generate")
    assert by_id[generate.parent.span_id].name == "pdserve.v1.Router/Generate"
    for method in ("Decode/Reserve", "Prefill/Prefill", "Decode/Decode"):
        (call,) = _named(trace, f"pdserve.v1.{method}", SpanKind.CLIENT)
        assert by_id[call.parent.span_id] is generate
    (prefill_call,) = _named(trace, "pdserve.v1.Prefill/Prefill", SpanKind.SERVER)
    for method in ("Lookup", "ReserveWrite", "CommitWrite"):
        (store_call,) = _named(trace, f"pdserve.v1.KVStore/{method}", SpanKind.SERVER)
        assert prefill_call in _ancestors(store_call, by_id)

    # The prefill worker's own spans: its queue, each chunk, each KV push (a chunk's child).
    chunks = _named(trace, "prefill.chunk")
    assert [c.attributes["pdserve.tokens"] for c in chunks] == [128, 72]
    assert all(prefill_call in _ancestors(s, by_id) for s in [*chunks, *_named(trace, "prefill.queue")])
    pushes = [s for s in _named(trace, "kv.send") if s.attributes["pdserve.transfer_id"].startswith("traced-1.")]
    assert pushes and all(by_id[p.parent.span_id] in chunks for p in pushes)
    assert sum(p.attributes["pdserve.blocks"] for p in pushes) == 13  # 200 tokens: 12 full blocks and a partial
    (receive,) = [s for s in _named(trace, "kv.receive") if s.attributes["pdserve.transfer_id"].startswith("traced-1.")]
    (decode_call,) = _named(trace, "pdserve.v1.Decode/Decode", SpanKind.SERVER)
    assert by_id[receive.parent.span_id] is decode_call
    (decoding,) = _named(trace, "decode.decode")
    # The prefill worker sampled the first token.
    assert decoding.attributes["pdserve.tokens_generated"] == completion.usage.completion_tokens - 1

    # The request's span carries the GenAI conventions' attributes, the routing decision
    # and the timing breakdown the client got.
    assert generate.attributes["pdserve.request_id"] == "traced-1"
    assert {k: v for k, v in generate.attributes.items() if k.startswith("gen_ai.")} == {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": 6,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 1.0,
        "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
        "gen_ai.response.finish_reasons": (completion.finish_reason,),
    }
    assert generate.attributes["pdserve.route.disaggregated"] is True
    assert generate.attributes["pdserve.route.prefill_worker_id"] == completion.route["prefill_worker_id"]
    for key in TIMING:
        assert generate.attributes[f"pdserve.timing.{key}"] == pytest.approx(getattr(completion.timing, key), rel=1e-5)


async def test_an_http_request_continues_the_callers_trace_from_its_traceparent(smollm2, exporter):
    trace_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    async with inprocess_suite(smollm2, "colocated", transport="loopback") as suite:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{suite.router.http.url}/completions",
                json={"prompt": "Hello", "max_tokens": 2, "temperature": 0},
                headers={"traceparent": f"00-{trace_id:032x}-{parent_id:016x}-01"},
            ) as r:
                assert r.status == 200, await r.text()
    spans = exporter.get_finished_spans()
    (generate,) = _named(spans, "router.generate")
    assert generate.context.trace_id == trace_id and generate.parent.span_id == parent_id
    served = [s for s in spans if s.kind == SpanKind.SERVER]
    assert served and {s.context.trace_id for s in served} == {trace_id}  # and the worker's calls with it


async def test_each_call_is_a_client_and_a_server_span_with_its_status(exporter):
    server, port, store = kvstore_serve.build(
        KVStoreConfig(port=0, capacity_blocks=4, transport="loopback"), block_bytes=4096
    )
    await server.start()
    channel = security.dial(f"127.0.0.1:{port}", interceptors=grpc_tracing.client_interceptors())
    stub = kvstore_pb2_grpc.KVStoreStub(channel)
    try:
        with tracing.tracer("test").start_as_current_span("test.calls") as root:
            found = await stub.Lookup(kpb.LookupRequest(kv_fingerprint=bytes(16), block_hashes=[b"x" * 16]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Lookup(kpb.LookupRequest(kv_fingerprint=b"bad", block_hashes=[]))
            await stub.GetStats(kpb.GetStoreStatsRequest())  # a poll: not traced
        await _until(lambda: len(exporter.get_finished_spans()) == 5)
    finally:
        await channel.close()
        await server.stop(grace=0)
    assert found.num_cached_blocks == 0 and refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {root.get_span_context().trace_id}
    clients = sorted(_named(spans, "pdserve.v1.KVStore/Lookup", SpanKind.CLIENT), key=lambda s: s.start_time)
    servers = {s.parent.span_id: s for s in _named(spans, "pdserve.v1.KVStore/Lookup", SpanKind.SERVER)}
    ok, bad = ((c, servers[c.context.span_id]) for c in clients)
    assert [s.attributes["rpc.grpc.status_code"] for s in (*ok, *bad)] == [0, 0, 3, 3]
    assert ok[1].attributes["pdserve.blocks_found"] == 0
    assert bad[0].status.status_code is StatusCode.ERROR  # the caller's call failed
    # The server records the refusal; a bad request is no fault of the server's.
    assert bad[1].status.status_code is StatusCode.UNSET
    assert [e.name for e in bad[1].events] == ["exception"]
