"""The grpc.aio server every pdserve service runs on.

- `create_server()` installs the one interceptor that turns the exceptions of
  `pdserve.common.errors` into gRPC status codes, so servicers and engine code
  raise plain Python exceptions and never touch the gRPC context.
- `add_health_service()` / `Health.set_serving()` expose the standard grpc.health.v1
  service (what Kubernetes gRPC probes and load balancers ask); `add_reflection()`
  the server reflection service (grpcurl and other tools list and call methods
  without the .proto files). `add_health_and_reflection()` does both. Every
  health answer carries this process's instance id (INSTANCE_ID_KEY).
- `bind()` listens, with TLS when given credentials (pdserve.common.security).
- every handler runs with its request's `request_id` bound for logging
  (pdserve.common.logs).
- `serve_until_stopped()` waits for SIGTERM/SIGINT, reports NOT_SERVING, and
  stops with a grace period so in-flight streams can finish.

Typical service main:

    server = create_server(interceptors=[config.authenticator()])  # token / API keys
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    health = await add_health_service(server, ["pdserve.v1.Decode"])
    port = bind(server, config.host, config.port, config.server_credentials())  # TLS if configured
    await server.start()
    await health.set_serving(True)           # once the model is loaded
    await serve_until_stopped(server, health=health, grace_s=config.grace_s)
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import OVERALL_HEALTH
from grpc_health.v1.health import aio as health_aio

from pdserve.common import errors, grpc_tracing, logs, tracing
from pdserve.common.grpc_handlers import wrap_handler
from pdserve.common.wire import bad_utf8_field

log = logging.getLogger(__name__)

# Most specific first: TransferTimeoutError is a TransferFailedError.
# A failed transfer is ABORTED, not UNAVAILABLE: retrying the same call cannot
# help (the ticket is one-time, the reservation gone); the caller must redo
# the whole exchange (reserve, prefill again) -- gRPC's "retry at a higher
# level". UNAVAILABLE stays unambiguous ("this worker cannot serve now, try
# another"), and channel retry policies, which replay UNAVAILABLE calls, never
# replay a call whose ticket is spent.
STATUS_CODES: tuple[tuple[type[errors.PdserveError], grpc.StatusCode], ...] = (
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.CapacityExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.TransferTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.TransferFailedError, grpc.StatusCode.ABORTED),
)
# Trailing metadata, so clients (SDK, router) can re-raise the same exception type.
ERROR_TYPE_KEY = "pdserve-error-type"
ERROR_FIELD_KEY = "pdserve-error-field"

DEFAULT_OPTIONS: dict[str, Any] = {
    "grpc.max_send_message_length": 64 * 2**20,
    "grpc.max_receive_message_length": 64 * 2**20,
    # Fail fast when the port is taken instead of silently sharing it.
    "grpc.so_reuseport": 0,
    # Find clients that vanished without closing (dead router, cut network),
    # so their streams are cancelled and the KV leases they hold freed.
    "grpc.keepalive_time_ms": 20_000,
    "grpc.keepalive_timeout_ms": 10_000,
    # Let callers ping as often as each second (the router pings workers mid-call): at gRPC's
    # default of 5 minutes, pings during a silent unary call (a long prefill) earn a GOAWAY.
    "grpc.http2.min_ping_interval_without_data_ms": 1_000,
}


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The status an exception maps to; INTERNAL for anything unexpected."""
    for error_type, code in STATUS_CODES:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code = status_code_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        # The client gets an incident id to quote, never our message or traceback.
        incident = uuid.uuid4().hex[:12]
        log.error("%s failed (incident %s)", method, incident, exc_info=exc)
        await context.abort(code, f"internal error (incident {incident})")
    else:
        metadata: list[tuple[str, str]] = [(ERROR_TYPE_KEY, type(exc).__name__)]
        if isinstance(exc, errors.InvalidRequestError):
            metadata.append((ERROR_FIELD_KEY, exc.field))
        log.debug("%s: %s: %s", method, code.name, exc)
        await context.abort(code, str(exc), trailing_metadata=tuple(metadata))


def _bind_request_id(request: Any) -> None:
    # Each RPC runs in a task of its own, so the binding ends with the call.
    request_id = getattr(request, "request_id", "")  # streamed requests (iterators) have none
    if request_id and isinstance(request_id, str):
        logs.bind_request(request_id)


class _Undecodable:
    """What a request whose bytes did not parse reaches the handler as.

    grpc.aio parses a unary request before any interceptor code runs, and
    answers a parse error UNKNOWN; the parse is the client's fault, so the
    guard below answers INVALID_ARGUMENT instead, naming the field."""

    __slots__ = ("error",)

    def __init__(self, error: errors.InvalidRequestError):
        self.error = error


def _decoding_error(deserialize: Callable[[bytes], Any], data: bytes, exc: Exception) -> errors.InvalidRequestError:
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)  # Message.FromString's class
    field = bad_utf8_field(descriptor, data) if descriptor is not None else None
    if field is not None:
        return errors.InvalidRequestError(field, "is not valid UTF-8")
    what = descriptor.full_name if descriptor is not None else "request message"
    reason = str(exc).rsplit(": ", 1)[-1]  # protobuf's text repeats the type name
    return errors.InvalidRequestError("request", f"is not a valid {what} ({reason})")


def _checked_deserializer(deserialize: Callable[[bytes], Any] | None, streamed: bool) -> Callable[[bytes], Any] | None:
    """Parse errors become InvalidRequestError: raised for request streams (the
    handler reads them, inside its guard), handed over as _Undecodable otherwise."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError; whatever fails to parse is the client's bytes
            error = _decoding_error(deserialize, data, e)
            if streamed:
                raise error from None
            return _Undecodable(error)

    return parse


def _guard_call(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """Wrap a coroutine handler (unary, or streaming via context.write)."""
    if not inspect.iscoroutinefunction(behavior):
        return behavior  # sync handlers need a thread pool; pdserve has none

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _abort(context, request.error, method)
        _bind_request_id(request)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler aborted with a status of its own choosing
        except Exception as exc:  # CancelledError is a BaseException: not caught
            await _abort(context, exc, method)

    return guarded


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """Wrap an async-generator handler; messages already sent stay sent."""
    if not inspect.isasyncgenfunction(behavior):
        return _guard_call(behavior, method)

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _abort(context, request.error, method)
        _bind_request_id(request)
        responses = behavior(request, context)
        try:
            async for response in responses:
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)
        finally:
            # Run the handler's own cleanup (lease release) now, not whenever
            # the event loop finalizes an abandoned generator.
            await responses.aclose()

    return guarded


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps pdserve exceptions, and request bytes that do not parse
    (INVALID_ARGUMENT, not grpc's UNKNOWN), to status codes for every handler kind."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        streamed = bool(handler.stream_unary or handler.stream_stream)
        return wrap_handler(handler, lambda b: _guard_call(b, method), lambda b: _guard_stream(b, method),
                            _checked_deserializer(handler.request_deserializer, streamed))


def create_server(
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: dict[str, Any] | None = None,
    maximum_concurrent_rpcs: int | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with the error mapping outermost, then tracing (a
    span per call, continuing the caller's trace; only if this process traces
    when the server is made, i.e. after tracing.setup()), then `interceptors`.

    Inner interceptors still see the original exception; `options` override
    DEFAULT_OPTIONS key by key.
    """
    merged = {**DEFAULT_OPTIONS, **(options or {})}
    return grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(), *([grpc_tracing.ServerInterceptor()] if tracing.enabled() else []),
                      *interceptors],
        options=list(merged.items()),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )


def bind(server: grpc.aio.Server, host: str, port: int,
         credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on host:port (0: any free port) and return the bound port; TLS
    with `credentials` (pdserve.common.security.SecurityConfig.server_credentials())."""
    bare_ipv6 = ":" in host and not host.startswith("[")
    address = f"[{host}]:{port}" if bare_ipv6 else f"{host}:{port}"
    bound = (server.add_secure_port(address, credentials) if credentials is not None
             else server.add_insecure_port(address))
    if bound == 0:  # older grpcio reports failure this way instead of raising
        raise RuntimeError(f"cannot listen on {address}")
    return bound


# Who answers a health check: the token `pdserve up` gives each process it starts (else one
# of our own), in the answer's trailing metadata, so the launcher counts only its own
# services ready, never another process on the same port.
INSTANCE_ID_ENV = "PDSERVE_INSTANCE_ID"
INSTANCE_ID_KEY = "pdserve-instance-id"


class Health(health_aio.HealthServicer):
    """grpc.health.v1.Health (asyncio) that remembers which names it reports,
    and says in each Check answer which process it is."""

    def __init__(self, services: Iterable[str] = ()) -> None:
        super().__init__()
        self.services = (OVERALL_HEALTH, *services)
        self.instance_id = os.environ.get(INSTANCE_ID_ENV) or uuid.uuid4().hex

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        context.set_trailing_metadata(((INSTANCE_ID_KEY, self.instance_id),))
        return await super().Check(request, context)

    async def set_serving(self, serving: bool) -> None:
        """Report the server ("") and every named service (NOT_)SERVING."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.services:
            await self.set(name, status)


async def add_health_service(server: grpc.aio.Server, services: Iterable[str] = ()) -> Health:
    """Register the standard health service, NOT_SERVING until the service
    calls `set_serving(True)` (e.g. once its model is loaded)."""
    health = Health(services)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set_serving(False)
    return health


def add_reflection(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Register server reflection (grpc.reflection.v1alpha) for these fully
    qualified service names, plus health and reflection themselves."""
    from grpc_reflection.v1alpha import reflection

    health = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*services, health, reflection.SERVICE_NAME), server)


async def add_health_and_reflection(server: grpc.aio.Server, services: Sequence[str]) -> Health:
    """Health (NOT_SERVING for "" and each name until set_serving) and reflection."""
    add_reflection(server, services)
    return await add_health_service(server, services)


async def serve_until_stopped(
    server: grpc.aio.Server,
    *,
    grace_s: float,
    health: Health | None = None,
    stop: asyncio.Event | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Serve until a signal (or `stop`), then shut down gracefully.

    Order matters: health goes NOT_SERVING first so probes and balancers stop
    sending work, then `on_shutdown` (e.g. deregister from the router), then
    the server refuses new RPCs and gives running ones `grace_s` to finish
    before cancelling them (cancellation frees their KV leases). grpc's own
    cut says only "Cancelling all calls"; the router's `on_shutdown` is its
    drain (pdserve.router.shutdown), which ends its streams first, with a word.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        # Shielded: cancelling a wait_for_termination() cancels the server's
        # own shutdown future, and stop() below would then fail.
        waiters = {asyncio.ensure_future(stop.wait()),
                   asyncio.shield(server.wait_for_termination())}
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        log.info("shutting down (grace %.1fs)", grace_s)
        if health is not None:
            await health.enter_graceful_shutdown()
        if on_shutdown is not None:
            await on_shutdown()
        await server.stop(grace_s)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


_ERROR_TYPES = {cls.__name__: cls for cls, _ in STATUS_CODES}
_BY_CODE = {code: cls for cls, code in reversed(STATUS_CODES)}


def error_from_rpc(exc: grpc.aio.AioRpcError) -> errors.PdserveError:
    """The typed error a downstream call failed with, so a service that relays
    it (the router) answers with the same status code and field."""
    trailing = dict(exc.trailing_metadata() or ())
    cls = _ERROR_TYPES.get(trailing.get(ERROR_TYPE_KEY, "")) or _BY_CODE.get(exc.code())
    details = exc.details() or exc.code().name
    if cls is errors.UnauthenticatedError:  # our credentials, not the client's: this worker is unusable
        return errors.NotReadyError(f"downstream refused this service's credentials: {details}")
    if cls is errors.InvalidRequestError:
        return errors.InvalidRequestError(trailing.get(ERROR_FIELD_KEY, "request"), details.split(": ", 1)[-1])
    if cls is None:  # UNKNOWN, INTERNAL, CANCELLED...: the worker is not usable for this request
        return errors.NotReadyError(f"downstream call failed: {exc.code().name}: {details}")
    return cls(details)
