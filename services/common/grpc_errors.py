"""pdserve's errors at the gRPC boundary, mapped in this one place.

- `ErrorMappingInterceptor` (outermost on every server, see pdserve.common.server)
  turns the exceptions of `pdserve.common.errors`, and request bytes that do not
  parse, into status codes, naming the type and field in trailing metadata;
- `relayed_error()` turns a downstream call's status back into the same exception,
  so a service that relays it (the router) answers with the same code and field.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from pdserve.common import errors, logs
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
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.TransferTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.TransferFailedError, grpc.StatusCode.ABORTED),
)
# Trailing metadata, so clients (SDK, router) can re-raise the same exception type.
ERROR_TYPE_KEY = "pdserve-error-type"
ERROR_FIELD_KEY = "pdserve-error-field"


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The status an exception maps to; INTERNAL for anything unexpected."""
    for error_type, code in STATUS_CODES:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


_ERROR_TYPES = {cls.__name__: cls for cls, _ in STATUS_CODES}
_BY_CODE = {code: cls for cls, code in reversed(STATUS_CODES)}
_SERVER_BUGS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


def relayed_error(exc: grpc.aio.AioRpcError) -> errors.PdserveError:
    """The typed error a downstream call failed with, so a service that relays
    it (the router) answers with the same status code and field."""
    trailing = dict(exc.trailing_metadata() or ())
    cls = _ERROR_TYPES.get(trailing.get(ERROR_TYPE_KEY, "")) or _BY_CODE.get(exc.code())
    details = exc.details() or exc.code().name
    if cls is errors.UnauthenticatedError:  # our credentials, not the client's: this worker is unusable
        return errors.NotReadyError(f"downstream refused this service's credentials: {details}")
    if cls is errors.InvalidRequestError:
        return errors.InvalidRequestError(trailing.get(ERROR_FIELD_KEY, "request"), details.split(": ", 1)[-1])
    if exc.code() in _SERVER_BUGS:  # no retry helps the client: it sees INTERNAL (an incident id), not UNAVAILABLE
        return errors.PdserveError(f"downstream call failed: {exc.code().name}: {details}")
    if cls is None:  # CANCELLED by the worker (draining) ...: that worker is not usable for this request
        return errors.NotReadyError(f"downstream call failed: {exc.code().name}: {details}")
    return cls(details)


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
        return wrap_handler(
            handler,
            lambda b: _guard_call(b, method),
            lambda b: _guard_stream(b, method),
            _checked_deserializer(handler.request_deserializer, streamed),
        )
