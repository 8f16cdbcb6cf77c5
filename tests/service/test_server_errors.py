"""Specification of pdserve.common.server, over a real grpc.aio server and channel.

Servicers raise the exceptions of pdserve.common.errors; clients see gRPC
status codes. The servicer here is the test's own, built on the generated
Decode stubs: it raises whatever error its request_id names.
"""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.common import errors
from pdserve.common.grpc_errors import ERROR_FIELD_KEY, ERROR_TYPE_KEY
from pdserve.common.server import add_health_service, bind, create_server, serve_until_stopped
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

Code = grpc.StatusCode
ERRORS = {  # request_id -> (raised, expected status, text the details must contain)
    "invalid": (
        errors.InvalidRequestError("sampling.top_p", "must be in (0, 1]"),
        Code.INVALID_ARGUMENT,
        "sampling.top_p: must be in (0, 1]",
    ),
    "capacity": (errors.CapacityExhaustedError("no free KV blocks"), Code.RESOURCE_EXHAUSTED, "no free KV blocks"),
    "not-ready": (errors.NotReadyError("model loading"), Code.UNAVAILABLE, "model loading"),
    "not-found": (errors.NotFoundError("unknown request r1"), Code.NOT_FOUND, "unknown request r1"),
    "timeout": (errors.TransferTimeoutError("transfer t1 timed out"), Code.DEADLINE_EXCEEDED, "transfer t1 timed out"),
    # ABORTED: redo reserve + prefill; UNAVAILABLE would mean "try another worker".
    "transfer": (errors.TransferFailedError("checksum mismatch"), Code.ABORTED, "checksum mismatch"),
}
SECRET = "/srv/secret/path token=hunter2"
BUGS = {  # unexpected exceptions, including look-alikes of mapped ones
    "bug": RuntimeError(SECRET),
    "plain-value-error": ValueError(SECRET),
    "plain-key-error": KeyError(SECRET),
}


def error_for(request_id: str) -> Exception:
    return ERRORS[request_id][0] if request_id in ERRORS else BUGS[request_id]


class RaisingDecode(decode_pb2_grpc.DecodeServicer):
    def __init__(self) -> None:
        self.cleaned_up = asyncio.Event()

    async def Release(self, request, context):  # unary
        raise error_for(request.request_id)

    async def Decode(self, request, context):  # streaming, async generator
        try:
            yield decode_pb2.DecodeResponse(token_ids=[1])
            if request.request_id == "slow":
                for token in range(2, 5):
                    await asyncio.sleep(0.1)
                    yield decode_pb2.DecodeResponse(token_ids=[token])
                return
            if request.request_id == "hang":
                await asyncio.Event().wait()
            raise error_for(request.request_id)
        finally:
            self.cleaned_up.set()  # where a real servicer frees its KV lease

    async def Generate(self, request, context):  # streaming via context.write
        await context.write(decode_pb2.DecodeResponse(token_ids=[1]))
        raise error_for(request.request_id)

    async def GetLoad(self, request, context):  # a handler may still abort itself
        await context.abort(Code.FAILED_PRECONDITION, "chose my own status")


@pytest.fixture
async def served():
    servicer = RaisingDecode()
    server = create_server()
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    health = await add_health_service(server, ["pdserve.v1.Decode"])
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, servicer, health, channel
    await server.stop(None)


def stub(channel) -> decode_pb2_grpc.DecodeStub:
    return decode_pb2_grpc.DecodeStub(channel)


async def read_stream(call) -> tuple[list, grpc.aio.AioRpcError]:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        async for message in call:
            received.append(list(message.token_ids))
    return received, failure.value


@pytest.mark.parametrize("request_id", sorted(ERRORS))
async def test_unary_errors_map_to_status_codes(served, request_id):
    _, code, details = ERRORS[request_id]
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub(served[3]).Release(decode_pb2.ReleaseRequest(request_id=request_id))
    assert failure.value.code() == code
    assert details in failure.value.details()
    metadata = dict(failure.value.trailing_metadata())
    assert metadata[ERROR_TYPE_KEY] == type(ERRORS[request_id][0]).__name__


async def test_invalid_request_names_the_field(served):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub(served[3]).Release(decode_pb2.ReleaseRequest(request_id="invalid"))
    assert failure.value.details().startswith("sampling.top_p")
    assert dict(failure.value.trailing_metadata())[ERROR_FIELD_KEY] == "sampling.top_p"


@pytest.mark.parametrize("request_id", sorted(ERRORS))
@pytest.mark.parametrize("rpc", ["Decode", "Generate"])
async def test_streaming_errors_map_after_messages_already_sent(served, rpc, request_id):
    _, code, details = ERRORS[request_id]
    call = getattr(stub(served[3]), rpc)
    request = decode_pb2.DecodeRequest if rpc == "Decode" else decode_pb2.LocalGenerateRequest
    received, failure = await read_stream(call(request(request_id=request_id)))
    assert received == [[1]]  # the token before the error still arrives
    assert failure.code() == code and details in failure.details()


@pytest.mark.parametrize("request_id", sorted(BUGS))
async def test_unexpected_errors_are_internal_without_leaking_internals(served, request_id, caplog):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub(served[3]).Release(decode_pb2.ReleaseRequest(request_id=request_id))
    _, stream_failure = await read_stream(stub(served[3]).Decode(decode_pb2.DecodeRequest(request_id=request_id)))
    for error in (failure.value, stream_failure):
        assert error.code() == Code.INTERNAL
        assert "hunter2" not in error.details() and "Error" not in error.details()
        assert "incident" in error.details()
    assert "hunter2" in caplog.text  # ...but the server log has it, under the incident id


@pytest.mark.parametrize(
    "method, data, field",
    [
        ("Release", b"\x0a\x02\xff\xfe", "request_id"),  # field 1, a string, is not UTF-8
        ("Release", b"\x0a\x05ab", "request"),  # a length past the end: no message at all
        ("Decode", b"\x0a\x01\x80", "request_id"),
    ],
)
async def test_request_bytes_that_do_not_parse_are_invalid_argument_naming_the_field(served, method, data, field):
    # grpc.aio itself would answer UNKNOWN, before any handler or interceptor code runs.
    call = served[3].unary_unary if method == "Release" else served[3].unary_stream
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        response = call(f"/pdserve.v1.Decode/{method}")(data)
        if method == "Decode":
            async for _ in response:
                pass
        else:
            await response
    assert failure.value.code() == Code.INVALID_ARGUMENT
    assert failure.value.details().startswith(f"{field}: ")
    assert dict(failure.value.trailing_metadata())[ERROR_FIELD_KEY] == field
    assert not served[1].cleaned_up.is_set()  # the handler never ran


async def test_a_handlers_own_abort_passes_through(served):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub(served[3]).GetLoad(common_pb2.GetLoadRequest())
    assert failure.value.code() == Code.FAILED_PRECONDITION
    assert failure.value.details() == "chose my own status"


async def test_successful_streams_are_untouched(served):
    call = stub(served[3]).Decode(decode_pb2.DecodeRequest(request_id="slow"))
    assert [list(m.token_ids) async for m in call] == [[1], [2], [3], [4]]
    assert await call.code() == Code.OK


async def test_cancelled_stream_runs_the_handlers_cleanup_at_once(served):
    servicer, channel = served[1], served[3]
    call = stub(channel).Decode(decode_pb2.DecodeRequest(request_id="hang"))
    assert list((await call.read()).token_ids) == [1]
    call.cancel()
    await asyncio.wait_for(servicer.cleaned_up.wait(), timeout=5)


async def test_health_is_not_serving_until_the_service_says_so(served):
    health, channel = served[2], served[3]
    checker = health_pb2_grpc.HealthStub(channel)
    Status = health_pb2.HealthCheckResponse

    async def status(service: str):
        return (await checker.Check(health_pb2.HealthCheckRequest(service=service))).status

    assert await status("") == Status.NOT_SERVING
    await health.set_serving(True)
    assert await status("") == Status.SERVING
    assert await status("pdserve.v1.Decode") == Status.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await status("pdserve.v1.Unknown")
    assert failure.value.code() == Code.NOT_FOUND


async def test_sigterm_drains_in_flight_streams_then_refuses_new_calls(served):
    server, _, health, channel = served
    await health.set_serving(True)
    call = stub(channel).Decode(decode_pb2.DecodeRequest(request_id="slow"))
    assert list((await call.read()).token_ids) == [1]  # in flight when the signal comes
    seen_during_shutdown = []

    async def on_shutdown():  # runs before the server stops taking calls
        checker = health_pb2_grpc.HealthStub(channel)
        response = await checker.Check(health_pb2.HealthCheckRequest(service=""))
        seen_during_shutdown.append(response.status)

    serving = asyncio.create_task(
        serve_until_stopped(server, grace_s=5, health=health, on_shutdown=on_shutdown, signals=(signal.SIGTERM,))
    )
    while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # handler not installed yet
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    rest = []
    while (message := await call.read()) is not grpc.aio.EOF:
        rest.append(list(message.token_ids))
    await asyncio.wait_for(serving, timeout=10)

    assert seen_during_shutdown == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert rest == [[2], [3], [4]] and await call.code() == Code.OK  # finished within grace
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub(channel).Release(decode_pb2.ReleaseRequest(request_id="invalid"))
    assert failure.value.code() == Code.UNAVAILABLE
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again


async def test_serving_also_ends_when_the_server_is_stopped_elsewhere(served):
    server = served[0]
    serving = asyncio.create_task(serve_until_stopped(server, grace_s=1, signals=()))
    await asyncio.sleep(0.05)
    await server.stop(None)  # e.g. a fatal engine error
    await asyncio.wait_for(serving, timeout=5)


def test_bind_reports_a_taken_port():
    async def scenario():
        first, second = create_server(), create_server()
        port = bind(first, "127.0.0.1", 0)
        with pytest.raises(RuntimeError):
            bind(second, "127.0.0.1", port)  # no silent SO_REUSEPORT sharing
        await first.stop(None)
        await second.stop(None)

    asyncio.run(scenario())
