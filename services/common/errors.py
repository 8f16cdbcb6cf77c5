"""The one exception hierarchy of pdserve.

Engine, transfer and store code raise these; a single server interceptor
(`pdserve.common.grpc_errors`) maps them to gRPC status codes, and the HTTP layer to
status codes, so no engine code ever touches a gRPC context.
"""

from __future__ import annotations


class PdserveError(Exception):
    """Base of every error pdserve raises on purpose."""


class InvalidRequestError(PdserveError, ValueError):
    """The request is malformed; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class MissingModelError(PdserveError, FileNotFoundError):
    """The model asked for (`--model`, or the bundled default) can't be had here: no such directory,
    file or hub id, no weights in it, or the package or extras it needs are not installed."""


class CapacityExhaustedError(PdserveError):
    """A bounded queue or pool is full; the client may retry later."""


class NotReadyError(PdserveError):
    """The service is starting, draining or missing a dependency."""


class FailedPreconditionError(PdserveError):
    """The request is well formed but the system is not in a state to do it (e.g. switch
    the role of a worker that is not elastic)."""


class NotFoundError(PdserveError, KeyError):
    """A named request, transfer or worker is unknown."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TransferFailedError(PdserveError):
    """A KV transfer failed (peer gone, bad ticket, size or checksum mismatch)."""


class TransferUnfencedError(TransferFailedError):
    """A cancelled transfer whose receives could not be drained: data might still land in its blocks,
    so their holder quarantines them (does not reuse them) until `fenced` is done (KVReceiver.when_fenced)."""

    def __init__(self, message: str, fenced=None) -> None:
        super().__init__(message)
        self.fenced = fenced


class TransferTimeoutError(TransferFailedError):
    """A KV transfer did not complete before its deadline."""


class UnauthenticatedError(PdserveError):
    """The caller sent no credentials, or wrong ones (API key, internal token)."""
