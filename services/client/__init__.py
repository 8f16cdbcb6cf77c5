"""The pdserve client SDK: stream completions from the router's Generate RPC.

`AsyncClient` and its synchronous twin `Client`. Leaving a stream early cancels its call, so the router cancels
every downstream RPC and frees the request's KV blocks. Failures raise PdserveClientError subclasses.
Guide: docs/client.md.
"""

from pdserve.client.aio import DEFAULT_TARGET, AsyncClient, ResponseStream
from pdserve.client.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    PdserveClientError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    error_from_rpc,
)
from pdserve.client.messages import Chunk, Completion, Timing, Usage, build_request
from pdserve.client.retry import NO_RETRY, RetryPolicy
from pdserve.client.sync import Client, SyncResponseStream
from pdserve.common.security import TLS

__all__ = [
    "DEFAULT_TARGET",
    "NO_RETRY",
    "TLS",
    "Aborted",
    "AsyncClient",
    "Cancelled",
    "Chunk",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "PdserveClientError",
    "ResourceExhausted",
    "ResponseStream",
    "RetryPolicy",
    "SyncResponseStream",
    "Timing",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "build_request",
    "error_from_rpc",
]
