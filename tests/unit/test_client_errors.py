"""The client SDK against a real grpc.aio server: parsing, error mapping,
deadlines and cancellation.

The Router servicer here is the test's own stand-in (the real router has its
end-to-end tests): it behaves as its request's text names, and records when
the server side of a call is cancelled, which is what frees KV downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading

import grpc
import pytest

from pdserve import client as sdk
from pdserve.common import errors
from pdserve.common.server import bind, create_server
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.polling import settles


class StandInRouter(router_pb2_grpc.RouterServicer):
    def __init__(self) -> None:
        self.requests: list[router_pb2.GenerateRequest] = []
        # Set from the server's loop, waited on from the test's (sync Client) thread too.
        self.cancelled = threading.Event()

    async def Generate(self, request, context):
        self.requests.append(request)
        behaviour = request.text
        try:
            if behaviour == "invalid":
                raise errors.InvalidRequestError("top_p", "must be in (0, 1]")
            if behaviour == "full":
                raise errors.CapacityExhaustedError("no free KV blocks")
            yield router_pb2.GenerateResponse(request_id="r1", token_ids=[1, 2], text="Hel")
            if behaviour in ("endless", "slow"):
                while True:  # a long generation: only cancellation ends it
                    await asyncio.sleep(0.05 if behaviour == "endless" else 10)
                    yield router_pb2.GenerateResponse(request_id="r1", token_ids=[3], text="l")
            if behaviour == "bug":
                raise RuntimeError("secret detail")
            yield router_pb2.GenerateResponse(
                request_id="r1",
                token_ids=[3],
                text="lo",
                logprobs=[-0.5],
                finish_reason=common_pb2.FINISH_REASON_LENGTH,
                usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=3, cached_tokens=2),
                timing=common_pb2.TimingBreakdown(queued_ms=1, prefill_ms=2, ttft_ms=3, total_ms=9),
                route=router_pb2.RouteInfo(
                    prefill_worker_id="prefill-0", decode_worker_id="decode-0", disaggregated=True
                ),
            )
        except (asyncio.CancelledError, GeneratorExit):
            # Where the real router cancels downstream RPCs. A cancel that lands while this
            # handler awaits is a CancelledError; one that lands while the server sends what
            # it yielded leaves it at the yield, closed afterwards with GeneratorExit.
            self.cancelled.set()
            raise


@pytest.fixture
async def router():
    servicer = StandInRouter()
    server = create_server()  # the real interceptor: real status codes and trailers
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def wait_cancelled(servicer: StandInRouter) -> None:
    if not await settles(servicer.cancelled.is_set, timeout=10):
        pytest.fail("the server never saw the call cancelled")


async def test_chunks_and_completion_are_parsed(router):
    servicer, target = router
    async with sdk.AsyncClient(target) as client:
        chunks = [c async for c in client.generate("ok", max_tokens=3, temperature=0.0, stop="\n", top_k=5)]
        completion = await client.complete("ok")
    assert [c.text for c in chunks] == ["Hel", "lo"] and chunks[0].finish_reason is None
    last = chunks[-1]
    assert last.usage == sdk.Usage(4, 3, 2)
    assert last.timing == sdk.Timing(1, 2, 0, 0, 3, 9)
    assert last.route == {"prefill_worker_id": "prefill-0", "decode_worker_id": "decode-0", "disaggregated": True}
    assert completion.text == "Hello" and completion.token_ids == [1, 2, 3]
    assert completion.finish_reason == "length" and completion.logprobs == [-0.5]
    sampling = servicer.requests[0].sampling
    assert sampling.max_tokens == 3 and sampling.HasField("temperature") and sampling.temperature == 0.0
    assert list(sampling.stop) == ["\n"] and sampling.top_k == 5 and not sampling.HasField("top_p")


async def test_prompt_forms(router):
    servicer, target = router
    async with sdk.AsyncClient(target) as client:
        await client.complete([5, 6, 7])
        await client.complete(messages=[{"role": "user", "content": "hi"}])
    assert servicer.requests[0].token_ids.ids == [5, 6, 7]
    assert servicer.requests[1].WhichOneof("prompt") == "chat"
    assert servicer.requests[1].chat.messages[0].content == "hi"


def test_bad_arguments_fail_before_any_rpc():
    with pytest.raises(sdk.InvalidArgument) as info:
        sdk.build_request("x", messages=[])
    assert info.value.field == "prompt"
    with pytest.raises(sdk.InvalidArgument) as info:
        sdk.build_request("x", max_tokens=-1)
    assert info.value.field == "max_tokens" and isinstance(info.value, ValueError)


async def test_invalid_argument_carries_the_field(router):
    _, target = router
    async with sdk.AsyncClient(target) as client:
        with pytest.raises(sdk.InvalidArgument) as info:
            await client.complete("invalid")
    err = info.value
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and err.field == "top_p"
    assert "must be in (0, 1]" in err.details and err.error_type == "InvalidRequestError"


@pytest.mark.parametrize(
    "text, error, retryable", [("full", sdk.ResourceExhausted, True), ("bug", sdk.Internal, False)]
)
async def test_status_codes_map_to_exceptions(router, text, error, retryable):
    _, target = router
    async with sdk.AsyncClient(target) as client:
        stream = client.generate(text)
        with pytest.raises(error) as info:
            async for _ in stream:
                pass
    assert info.value.retryable is retryable and "secret" not in str(info.value)


async def test_unreachable_router_is_unavailable():
    async with sdk.AsyncClient("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(sdk.Unavailable):
            await client.complete("ok")


async def test_deadline_per_call_and_client_default(router):
    servicer, target = router
    async with sdk.AsyncClient(target, timeout=0.3) as client:
        with pytest.raises(sdk.DeadlineExceeded):
            await client.complete("slow")
        with pytest.raises(TimeoutError):  # DeadlineExceeded is a TimeoutError too
            await client.complete("slow", timeout=0.2)
    await wait_cancelled(servicer)


async def test_leaving_async_with_cancels_the_server_call(router):
    servicer, target = router
    async with sdk.AsyncClient(target) as client:
        async with client.stream("endless") as stream:
            async for chunk in stream:
                break
        assert chunk.text == "Hel"
        await wait_cancelled(servicer)


async def test_break_out_of_plain_async_for_cancels(router):
    servicer, target = router
    async with sdk.AsyncClient(target) as client:
        async for _ in client.generate("endless"):
            break  # the stream object dies here (CPython refcounting) and cancels
        await wait_cancelled(servicer)


async def test_aclosing_and_task_cancellation_cancel(router):
    servicer, target = router
    async with sdk.AsyncClient(target) as client:
        async with contextlib.aclosing(client.generate("endless")) as stream:
            await anext(stream)
        await wait_cancelled(servicer)
        servicer.cancelled.clear()

        streaming = asyncio.Event()

        async def consume():
            async for _ in client.generate("slow"):
                streaming.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(streaming.wait(), 10)  # the server's handler is running: a cancel reaches it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_cancelled(servicer)


async def test_cancel_from_another_task_ends_the_stream_quietly(router):
    servicer, target = router
    async with sdk.AsyncClient(target) as client:
        stream = client.generate("slow")
        first = await anext(stream)
        asyncio.get_running_loop().call_later(0.1, stream.cancel)
        rest = [c async for c in stream]
    assert first.text == "Hel" and rest == []
    await wait_cancelled(servicer)


async def test_sync_client(router):
    servicer, target = router

    def use() -> sdk.Completion:
        with sdk.Client(target, timeout=5) as client:
            assert [c.text for c in client.generate("ok")] == ["Hel", "lo"]
            with client.stream("endless") as stream:
                next(stream)
            assert servicer.cancelled.wait(5), "leaving `with` did not cancel"
            servicer.cancelled.clear()
            for _ in client.generate("endless"):
                break
            assert servicer.cancelled.wait(5), "break did not cancel"
            with pytest.raises(sdk.InvalidArgument) as info:
                client.complete("invalid")
            assert info.value.field == "top_p"
            return client.complete([1, 2])

    completion = await asyncio.to_thread(use)  # the server needs this loop free
    assert completion.text == "Hello"


def test_a_sync_client_dropped_without_close_ends_its_thread():
    client = sdk.Client("127.0.0.1:1")  # the channel connects lazily: nothing needs to listen
    thread = client._thread
    del client
    gc.collect()
    thread.join(10)
    assert not thread.is_alive(), "a dropped Client left its loop's thread running"
