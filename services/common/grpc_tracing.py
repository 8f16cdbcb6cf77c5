"""W3C trace context across gRPC hops, so router -> prefill -> decode -> kvstore is one trace.

- `ServerInterceptor` (installed by server.create_server in a process that
  traces) continues the caller's trace context from gRPC metadata in a SERVER
  span;
- `client_interceptors()` (on every channel of a process that traces, and
  always on the client SDK's) open a CLIENT span per call and send its context.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from pdserve.common.grpc_errors import status_code_for
from pdserve.common.grpc_handlers import wrap_handler
from pdserve.common.tracing import enabled, fail, tracer, within

# Polls and heartbeats: a trace each, several a second, would drown the requests.
UNTRACED_METHODS = frozenset({"GetLoad", "Heartbeat", "GetStats"})


def _rpc(method: str | bytes) -> tuple[str, str]:
    """'/pdserve.v1.Decode/Reserve' -> ('pdserve.v1.Decode', 'Reserve')."""
    if isinstance(method, bytes):
        method = method.decode()
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _traced(rpc_service: str, rpc_method: str) -> bool:
    return enabled() and rpc_service.startswith("pdserve.") and rpc_method not in UNTRACED_METHODS


def _rpc_attributes(rpc_service: str, rpc_method: str) -> dict[str, str]:
    return {"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": rpc_method}


# Server-side codes that are the server's fault (OpenTelemetry's RPC conventions):
# the others (a bad request, a missing reservation) leave a server span's status unset.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _server_failed(span: trace.Span, exc: BaseException) -> None:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) or not span.is_recording():
        fail(span, exc)
        return
    code = status_code_for(exc) if not isinstance(exc, grpc.aio.AbortError) else grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.record_exception(exc)
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per call of a pdserve method, child of the caller's span
    (W3C traceparent in the metadata) and current while the handler runs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        rpc_service, rpc_method = _rpc(details.method)
        if handler is None or not _traced(rpc_service, rpc_method):
            return handler
        parent = propagate.extract(dict(details.invocation_metadata or ()))
        attributes = {
            **_rpc_attributes(rpc_service, rpc_method),
            "pdserve.service": rpc_service.rsplit(".", 1)[-1].lower(),
        }
        name = f"{rpc_service}/{rpc_method}"

        def open_span(request: Any) -> tuple[trace.Span, otel_context.Context]:
            span = tracer("pdserve.grpc").start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
            request_id = getattr(request, "request_id", None)
            if request_id and isinstance(request_id, str):
                span.set_attribute("pdserve.request_id", request_id)
            return span, trace.set_span_in_context(span, parent)

        return wrap_handler(
            handler,
            lambda b: _server_call(b, open_span),
            lambda b: _server_stream(b, open_span),
            handler.request_deserializer,
        )


def _server_call(behavior: Callable[..., Any], open_span) -> Callable[..., Any]:
    if not inspect.iscoroutinefunction(behavior):
        return behavior

    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        span, ctx = open_span(request)
        token = otel_context.attach(ctx)
        try:
            response = await behavior(request, context)
            span.set_attribute("rpc.grpc.status_code", 0)
        except BaseException as e:
            _server_failed(span, e)
            raise
        finally:
            otel_context.detach(token)
            span.end()
        return response

    return traced


def _server_stream(behavior: Callable[..., Any], open_span) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        return _server_call(behavior, open_span)

    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        span, ctx = open_span(request)
        responses = within(ctx, behavior(request, context))
        try:
            async for response in responses:
                yield response
            span.set_attribute("rpc.grpc.status_code", 0)
        except BaseException as e:
            _server_failed(span, e)
            raise
        finally:
            await responses.aclose()
            span.end()

    return traced


class _ClientSpans:
    """A CLIENT span per call, child of the caller's current span, its context
    sent as traceparent; it ends when the call does (streams included)."""

    _ending: set[asyncio.Task] = set()  # keeps the span-ending tasks alive until they run

    async def _intercept(self, continuation, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        rpc_service, rpc_method = _rpc(details.method)
        span = None
        if _traced(rpc_service, rpc_method):
            span = tracer("pdserve.grpc").start_span(
                f"{rpc_service}/{rpc_method}", kind=SpanKind.CLIENT, attributes=_rpc_attributes(rpc_service, rpc_method)
            )
        elif not trace.get_current_span().get_span_context().is_valid:
            return await continuation(details, request)
        # else an application tracing on its own (an SDK user): the call continues its trace
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span) if span else None)
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
        try:
            call = await continuation(details._replace(metadata=metadata), request)
        except BaseException as e:
            if span is not None:
                fail(span, e)
                span.end()
            raise
        if span is not None:
            call.add_done_callback(functools.partial(self._done, span))
        return call

    def _done(self, span: trace.Span, call: grpc.aio.Call) -> None:
        # The status is only readable by awaiting, which a done callback cannot.
        task = asyncio.ensure_future(_end_client_span(span, call))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)


# One class per call kind: a grpc.aio channel files each interceptor under the
# first kind it implements only.
class _UnaryUnary(_ClientSpans, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await self._intercept(continuation, details, request)


class _UnaryStream(_ClientSpans, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await self._intercept(continuation, details, request)


class _StreamUnary(_ClientSpans, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await self._intercept(continuation, details, request_iterator)


class _StreamStream(_ClientSpans, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await self._intercept(continuation, details, request_iterator)


async def _end_client_span(span: trace.Span, call: grpc.aio.Call) -> None:
    try:
        code = await call.code()
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is grpc.StatusCode.CANCELLED:
        span.set_attribute("pdserve.cancelled", True)  # we stopped it (stop string, client gone)
    elif code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {await call.details()}"))
    span.end()


def client_interceptors(*, always: bool = False) -> list[grpc.aio.ClientInterceptor]:
    """For `interceptors=` of every aio channel to a pdserve service: none unless
    this process traces when the channel is made (grpc.aio's interceptor machinery
    costs CPU on every call); `always` for the client SDK, whose application may
    trace on its own."""
    if not (always or enabled()):
        return []
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]
