"""Which failures a request survives: a worker's (retried elsewhere) or its own.

A retry continues from `Progress.context` (router/attempt.py), so the client
sees one stream with no token lost or repeated (docs/reliability.md).
"""

from __future__ import annotations

import grpc

from pdserve.router.worker_handle import WorkerHandle

# A worker's failure, not the request's: another worker may well succeed.
# (INVALID_ARGUMENT and FAILED_PRECONDITION are the request's; retrying cannot help.)
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # process gone, connection refused or reset, draining
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a per-attempt deadline, not the client's (checked first)
        grpc.StatusCode.ABORTED,  # KV transfer failed: ticket, size or checksum
        grpc.StatusCode.NOT_FOUND,  # the decode reservation expired before Decode claimed it
        grpc.StatusCode.CANCELLED,  # cancelled by the worker's side (the router's own cancel never gets here)
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # this worker's queue is full; another's may not be
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)


class WorkerFailedError(Exception):
    """An attempt failed because of `worker`; the router may retry elsewhere."""

    def __init__(self, worker: WorkerHandle, phase: str, cause: grpc.aio.AioRpcError | None, detail: str = ""):
        self.worker = worker
        self.phase = phase
        self.cause = cause
        what = detail or (f"{cause.code().name}: {cause.details()}" if cause is not None else "failed")
        super().__init__(f"{phase} on {worker.worker_id}: {what}")


def failure(worker: WorkerHandle, phase: str, e: grpc.aio.AioRpcError, deadline_passed: bool) -> Exception:
    """The exception for a downstream call's error: retryable or the request's own."""
    if e.code() in RETRYABLE and not deadline_passed:
        return WorkerFailedError(worker, phase, e)
    return e
