"""The pdserve client SDK: stream completions from the router's Generate RPC.

    async with AsyncClient("localhost:50051") as client:
        async with client.stream("Hello", max_tokens=32) as stream:
            async for chunk in stream:
                print(chunk.text, end="")

Leaving a stream early cancels its gRPC call, so the router cancels every
downstream RPC and frees the request's KV blocks. `Client` is the synchronous
twin. Failures raise PdserveClientError subclasses. Guide: docs/client.md.
"""

from pdserve.client.aio import DEFAULT_TARGET, AsyncClient, ResponseStream
from pdserve.client.errors import (Aborted, Cancelled, DeadlineExceeded, Internal, InvalidArgument, PdserveClientError,
                                   ResourceExhausted, Unauthenticated, Unavailable, error_from_rpc)
from pdserve.client.messages import Chunk, Completion, Timing, Usage, build_request
from pdserve.client.retry import NO_RETRY, RetryPolicy
from pdserve.client.sync import Client, SyncResponseStream
from pdserve.common.security import TLS

__all__ = ["DEFAULT_TARGET", "NO_RETRY", "TLS", "Aborted", "AsyncClient", "Cancelled", "Chunk", "Client", "Completion",
           "DeadlineExceeded", "Internal", "InvalidArgument", "PdserveClientError", "ResourceExhausted",
           "ResponseStream", "RetryPolicy", "SyncResponseStream", "Timing", "Unauthenticated", "Unavailable", "Usage",
           "build_request", "error_from_rpc"]
