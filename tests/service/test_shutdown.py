"""A router shutting down: never a silent end.

New requests are refused with a word (HTTP 503, gRPC UNAVAILABLE), running ones get the
grace period, and those still open when it ends are cut with a word too: an error event,
then [DONE] and a clean end, on SSE; a 503 for a plain HTTP request; UNAVAILABLE on gRPC.
A real router (in this process, and once as its own process) in front of a real null
worker (services/bench/null_worker.py) streaming a token every 20 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys

import aiohttp
import grpc
import pytest

from pdserve.bench.null_worker import NullWorker, NullWorkerConfig
from pdserve.router.config import RouterConfig
from pdserve.router.serve import RouterRuntime, load_tokenizer
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from pdserve.v1 import router_pb2_grpc
from tests.polling import settles

LONG = 3000  # tokens: 60 s at the worker's pace, longer than any test waits
SHUTTING_DOWN = "the server is shutting down"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("")  # the router's tokenizer and context window; no weights


@contextlib.asynccontextmanager
async def slow_worker():
    worker = NullWorker(NullWorkerConfig(port=0, token_interval_ms=20))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.aclose()


@contextlib.asynccontextmanager
async def serving_router(tokenizer, grace_s: float):
    """A router running as `pdserve serve router` does (run(): serve until stopped, then drain),
    stopped by `stop` instead of a signal."""
    async with slow_worker() as worker:
        config = RouterConfig(
            port=0,
            http_port=0,
            metrics_port=-1,
            mode="colocated",
            load_poll_s=0.2,
            decode_targets=[f"127.0.0.1:{worker.port}"],
            grace_s=grace_s,
        )
        router = RouterRuntime(config, *tokenizer)
        stop = asyncio.Event()
        serving = asyncio.create_task(router.run(stop))
        try:
            assert await settles(lambda: serving.done() or (router.http.url and router.pool.ready()), 30)
            assert not serving.done()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
                yield router, worker, router_pb2_grpc.RouterStub(channel), stop, serving
        finally:
            stop.set()
            await asyncio.wait_for(serving, 60)


def _request(max_tokens: int, stream: bool) -> dict:
    return {"prompt": "hi", "max_tokens": max_tokens, "stream": stream}


async def _events(resp: aiohttp.ClientResponse):
    """The SSE stream's data, parsed; aiohttp raises ClientPayloadError if it ends unterminated."""
    async for line in resp.content:
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            yield data if data == "[DONE]" else json.loads(data)


async def test_streams_open_when_the_grace_ends_are_told_the_server_is_shutting_down(tokenizer):
    # The grace outlasts the checks below on any machine; the test then ends it itself.
    async with serving_router(tokenizer, grace_s=60.0) as (router, worker, stub, stop, serving):
        async with aiohttp.ClientSession() as http:
            url = router.http.url + "/completions"
            sse = await http.post(url, json=_request(LONG, stream=True))
            sse_events = _events(sse)
            assert "choices" in await anext(sse_events)
            plain = asyncio.create_task(http.post(url, json=_request(LONG, stream=False)))
            call = stub.Generate(rpb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=LONG)))
            assert (await call.read()).token_ids
            assert await settles(lambda: router.shutdown.running == 3)  # the plain one is in flight too

            stop.set()  # as SIGTERM does
            assert await settles(lambda: router.shutdown.draining)
            # Draining: new requests are refused, with a word, while the running ones go on.
            async with http.post(url, json=_request(2, stream=False)) as r:
                assert r.status == 503 and (await r.json())["error"]["message"] == SHUTTING_DOWN
            late = rpb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(late).read()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refused.value.details() == SHUTTING_DOWN
            async with http.get(router.http.url.removesuffix("/v1") + "/health") as r:
                assert r.status == 503

            # The grace ends: every open request hears why it ends.
            router.shutdown.end_grace()
            rest = [e async for e in sse_events]
            sse.release()
            assert rest[-1] == "[DONE]" and all("choices" in e for e in rest[:-2])
            assert rest[-2]["error"] == {
                "message": SHUTTING_DOWN,
                "type": "server_error",
                "param": None,
                "code": "service_unavailable",
            }
            async with await plain as r:
                assert r.status == 503 and (await r.json())["error"]["message"] == SHUTTING_DOWN
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert (cut.value.code(), cut.value.details()) == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        await asyncio.wait_for(serving, 30)
        assert await settles(lambda: worker.servicer.running == 0)  # the cut cancelled the worker's streams


async def test_a_stream_that_ends_within_the_grace_finishes_and_the_drain_ends_with_it(tokenizer):
    async with serving_router(tokenizer, grace_s=60.0) as (router, worker, stub, stop, serving):
        async with aiohttp.ClientSession() as http:
            async with http.post(router.http.url + "/completions", json=_request(40, stream=True)) as sse:
                events = _events(sse)
                first = await anext(events)
                stop.set()
                rest = [e async for e in events]
        assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
        assert len("".join(e["choices"][0]["text"] for e in [first, *rest[:-1]])) > 0
        await asyncio.wait_for(serving, 30)  # not the 60 s grace: nothing was left to wait for


async def test_ctrl_c_on_a_router_process_ends_its_stream_with_an_error_event(tokenizer):
    async with slow_worker() as worker:
        router = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pdserve",
                "serve",
                "router",
                "--mode",
                "colocated",
                "--port",
                "0",
                "--http-port",
                "0",
                "--metrics-port",
                "-1",
                "--grace-s",
                "1",
                "--load-poll-s",
                "0.2",
                "--decode-targets",
                f"127.0.0.1:{worker.port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            url = None
            while url is None:  # the banner says where it listens once it is ready
                line = await asyncio.wait_for(asyncio.to_thread(router.stdout.readline), 120)
                assert line, "the router exited before it was ready"
                url = (m := re.search(r"OpenAI-compatible API on (\S+)", line)) and m.group(1)
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "/completions", json=_request(LONG, stream=True)) as sse:
                    events = _events(sse)
                    assert "choices" in await anext(events)
                    router.send_signal(signal.SIGINT)
                    rest = [e async for e in events]
            assert rest[-1] == "[DONE]" and rest[-2]["error"]["message"] == SHUTTING_DOWN
            assert await asyncio.to_thread(router.wait, 60) == 0
        finally:
            if router.poll() is None:
                router.kill()
            router.wait()
