"""The SDK's exceptions: one class per gRPC status, with the server's field and type."""

from __future__ import annotations

import grpc


class PdserveClientError(Exception):
    """A failed call. `code`: the gRPC status; `field`: the offending request
    field (INVALID_ARGUMENT only); `error_type`: the server's exception name."""

    status: grpc.StatusCode | None = None
    retryable = False  # True: the same request may succeed later or elsewhere

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        field: str | None = None,
        error_type: str | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(details)
        self.code = code or self.status
        self.details = details
        self.field = field
        self.error_type = error_type
        self.request_id = request_id

    def __str__(self) -> str:
        code = self.code.name if self.code else "ERROR"
        named = not self.field or self.details.startswith(f"{self.field}:")  # pdserve's "field: reason"
        return f"{code}: {self.details}" + ("" if named else f" [field {self.field}]")


class InvalidArgument(PdserveClientError, ValueError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(PdserveClientError):
    status, retryable = grpc.StatusCode.RESOURCE_EXHAUSTED, True


class Unavailable(PdserveClientError):
    status, retryable = grpc.StatusCode.UNAVAILABLE, True


class Aborted(PdserveClientError):
    """A KV transfer failed; retrying the whole request is safe."""

    status, retryable = grpc.StatusCode.ABORTED, True


class DeadlineExceeded(PdserveClientError, TimeoutError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(PdserveClientError):
    """Cancelled by the server (shutting down) or by closing the client mid-stream;
    a stream you cancel or leave yourself just ends."""

    status = grpc.StatusCode.CANCELLED


class Internal(PdserveClientError):
    status = grpc.StatusCode.INTERNAL


class Unauthenticated(PdserveClientError):
    """No API key, or a wrong one (`api_key=` / PDSERVE_API_KEY)."""

    status = grpc.StatusCode.UNAUTHENTICATED


_ERRORS = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        ResourceExhausted,
        Unavailable,
        Aborted,
        DeadlineExceeded,
        Cancelled,
        Internal,
        Unauthenticated,
    )
}


def error_from_rpc(
    exc: grpc.aio.AioRpcError | grpc.RpcError,
    request_id: str = "",
    target: str = "",
    attempts: int = 1,
    streamed: bool = False,
) -> PdserveClientError:
    """The SDK exception for a failed RPC, using pdserve's trailing metadata;
    `attempts`: the calls the SDK made (said when it retried); `streamed`: chunks were
    delivered before it failed (calling again would repeat their text: not retryable)."""
    trailers = dict(exc.trailing_metadata() or ())
    cls = _ERRORS.get(exc.code(), PdserveClientError)
    details = exc.details() or ""
    if attempts > 1:
        details += f" (after {attempts} attempts)"
    if exc.code() is grpc.StatusCode.UNIMPLEMENTED:  # no pdserve servicer answers it: no Router service there
        details = (
            f"{target or 'the server'} does not serve pdserve.v1.Router ({details}): is it a worker? "
            "Point the client (pdserve generate --target) at the router"
        )
    error = cls(
        details,
        code=exc.code(),
        field=trailers.get("pdserve-error-field"),
        error_type=trailers.get("pdserve-error-type"),
        request_id=request_id,
    )
    if streamed:
        error.retryable = False
    return error
