"""The SDK calls again when a call fails UNAVAILABLE before its first token, and never after one.

A real grpc.aio server with the test's own Router servicer, failing as told."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pdserve import client as sdk
from pdserve.common.server import bind, create_server
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc

FAST = sdk.RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


class FlakyRouter(router_pb2_grpc.RouterServicer):
    """Fails its first `failures` calls with `code` (after `tokens_first` token messages), then streams."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE, tokens_first: int = 0) -> None:
        self.failures, self.code, self.tokens_first, self.calls = failures, code, tokens_first, 0

    async def Generate(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            for i in range(self.tokens_first):
                yield router_pb2.GenerateResponse(token_ids=[10 + i], text="x")
            await context.abort(self.code, "worker pool is empty")
        yield router_pb2.GenerateResponse(token_ids=[1, 2], text="ok", finish_reason=common_pb2.FINISH_REASON_LENGTH)


@pytest.fixture
async def serve():
    servers = []

    async def start(servicer) -> str:
        server = create_server()
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


async def test_unavailable_before_the_first_token_is_called_again_until_it_streams(serve):
    router = FlakyRouter(failures=2)
    async with sdk.AsyncClient(await serve(router), retry=FAST) as client:
        completion = await client.complete("hi")
    assert completion.token_ids == [1, 2] and router.calls == 3


async def test_a_stream_cut_after_a_token_is_never_called_again(serve):
    router = FlakyRouter(failures=1, tokens_first=1)
    async with sdk.AsyncClient(await serve(router), retry=FAST) as client:
        seen = []
        with pytest.raises(sdk.Unavailable) as e:
            async for chunk in client.generate("hi"):
                seen += chunk.token_ids
    assert seen == [10] and router.calls == 1  # the router migrates started streams; a retry would repeat tokens
    assert not e.value.retryable  # nor is the caller told to


async def test_the_bound_ends_it_with_the_last_error_saying_how_many_calls(serve):
    router = FlakyRouter(failures=99)
    async with sdk.AsyncClient(await serve(router), retry=FAST) as client:
        with pytest.raises(sdk.Unavailable, match=r"worker pool is empty \(after 3 attempts\)"):
            await client.complete("hi")
    assert router.calls == 3


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL]
)
async def test_other_codes_are_not_called_again(serve, code):
    router = FlakyRouter(failures=1, code=code)
    async with sdk.AsyncClient(await serve(router), retry=FAST) as client:
        with pytest.raises(sdk.PdserveClientError) as info:
            await client.complete("hi")
    assert info.value.code == code and router.calls == 1


async def test_retries_stay_within_the_callers_deadline(serve):
    router = FlakyRouter(failures=99)
    slow = sdk.RetryPolicy(max_attempts=50, initial_backoff_s=0.2, max_backoff_s=0.2, jitter=0.0)
    async with sdk.AsyncClient(await serve(router), retry=slow, timeout=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(sdk.Unavailable):
            await client.complete("hi")
    assert time.monotonic() - t0 < 0.6 and router.calls == 3  # at 0, 0.2 and 0.4 s; no wait past 0.5 s


async def test_no_retry_makes_one_call_and_the_sync_client_retries_too(serve):
    target = await serve(router := FlakyRouter(failures=2))
    async with sdk.AsyncClient(target, retry=None) as client:
        with pytest.raises(sdk.Unavailable):
            await client.complete("hi")
    assert router.calls == 1

    def sync_call() -> list[int]:  # off this loop: it serves the router the sync client waits on
        with sdk.Client(target, retry=FAST) as client:
            return client.complete("hi").token_ids

    assert await asyncio.to_thread(sync_call) == [1, 2] and router.calls == 3  # failed once more, then streamed


def test_backoff_doubles_to_its_cap_within_the_jitter():
    policy = sdk.RetryPolicy(initial_backoff_s=0.25, max_backoff_s=1.0, jitter=0.2)
    for failed, base in ((1, 0.25), (2, 0.5), (3, 1.0), (6, 1.0)):
        assert 0.8 * base <= policy.backoff_s(failed) <= 1.2 * base
    with pytest.raises(ValueError, match="max_attempts >= 1"):
        sdk.RetryPolicy(max_attempts=0)


SLOW = sdk.RetryPolicy(max_attempts=3, initial_backoff_s=0.3, max_backoff_s=0.3)


async def test_a_stream_cancelled_while_it_waits_to_call_again_just_ends_and_calls_no_more(serve):
    router = FlakyRouter(failures=99)
    async with sdk.AsyncClient(await serve(router), retry=SLOW) as client:
        stream = client.generate("hi")

        async def read() -> list:
            return [chunk async for chunk in stream]

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.1)  # the first call failed; it waits to call again
        stream.cancel()  # the user's stop button
        assert await reader == []
        await asyncio.sleep(0.5)
    assert router.calls == 1 and stream.attempts == 1


async def test_a_client_closed_under_a_waiting_stream_ends_it_with_a_typed_error(serve):
    router = FlakyRouter(failures=99)
    client = sdk.AsyncClient(await serve(router), retry=SLOW)
    reader = asyncio.create_task(client.complete("hi"))
    await asyncio.sleep(0.1)
    await client.close()
    with pytest.raises(sdk.Cancelled):
        await reader
    with pytest.raises(sdk.Cancelled):
        await client.complete("hi")  # and a call after close


def test_a_sync_client_that_cannot_be_made_leaves_no_thread_behind(tmp_path):
    import threading

    before = sum(t.name == "pdserve-client" for t in threading.enumerate())
    with pytest.raises(Exception):
        sdk.Client(tls=sdk.TLS(ca=str(tmp_path / "missing.pem")))
    assert sum(t.name == "pdserve-client" for t in threading.enumerate()) == before


class _CutRouter(router_pb2_grpc.RouterServicer):
    """Names the request it generates (the caller gave no id), sends a token, then fails."""

    async def Generate(self, request, context):
        yield router_pb2.GenerateResponse(request_id="router-made-7", token_ids=[1], text="x")
        await context.abort(grpc.StatusCode.UNAVAILABLE, "gave up")


async def test_an_error_names_the_request_id_the_router_gave_when_the_caller_gave_none(serve):
    async with sdk.AsyncClient(await serve(_CutRouter()), retry=FAST) as client:
        with pytest.raises(sdk.Unavailable) as e:
            await client.complete("hi")
    assert e.value.request_id == "router-made-7"  # what the router's logs and traces carry
