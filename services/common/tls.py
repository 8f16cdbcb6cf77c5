"""TLS from PEM files, and `dial()`: the one function that opens a client channel
(TLS when given, fixed metadata such as the internal token on every call)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


def read_file(path: str, what: str) -> bytes:
    """The bytes of the file a setting (`what`) names; ValueError naming the setting if unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from None


@dataclass(frozen=True)
class TLS:
    """PEM file paths for one side of a TLS connection. All empty: verify the
    peer against the system's roots and present no certificate."""

    ca: str = ""  # CA bundle that signs the peer's certificate
    cert: str = ""  # our certificate chain, presented to the peer (client side: for mTLS)
    key: str = ""  # its private key
    server_name: str = ""  # name to verify in the server's certificate instead of the target's host

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_file(self.ca, "tls_ca") if self.ca else None,
            private_key=read_file(self.key, "tls_key") if self.key else None,
            certificate_chain=read_file(self.cert, "tls_cert") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(read_file(self.key, "tls_key"), read_file(self.cert, "tls_cert"))],
            root_certificates=read_file(self.ca, "tls_ca") if self.ca else None,
            require_client_auth=require_client_cert,
        )


class _AddMetadata:
    """Adds fixed metadata (the internal token) to every call of an aio channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self.metadata = tuple(metadata)

    async def _intercept(self, continuation, details: grpc.aio.ClientCallDetails, request):
        merged = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return await continuation(details._replace(metadata=merged), request)


# grpc.aio files an interceptor under the first call kind it implements
# (an if/elif chain), so each kind needs an instance of its own.
class _AddMetadataUU(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AddMetadata._intercept


class _AddMetadataUS(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AddMetadata._intercept


class _AddMetadataSU(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AddMetadata._intercept


class _AddMetadataSS(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AddMetadata._intercept


# A peer that restarts (a worker loading its model takes ~10 s) is reconnected within half a second:
# gRPC's default backoff (1 s, x1.6 an attempt) left a worker back after 13 s unseen by the router until 16.
RECONNECT = {"grpc.initial_reconnect_backoff_ms": 100, "grpc.max_reconnect_backoff_ms": 500}


def dial(
    target: str,
    tls: TLS | None = None,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
    sync: bool = False,
) -> Any:
    """Open a channel to `target`: TLS when `tls` is given, `metadata` (e.g. the
    internal token) on every call, then `interceptors` (e.g. tracing).
    A grpc.aio.Channel, or a blocking grpc.Channel with sync=True. `options` override RECONNECT."""
    options = [*{**RECONNECT, **dict(options)}.items(), *(tls.channel_options() if tls else ())]
    if sync:  # tools polling health (open methods): no per-call metadata needed
        if metadata:
            raise ValueError("dial: per-call metadata needs an aio channel")
        channel = (
            grpc.secure_channel(target, tls.channel_credentials(), options=options)
            if tls
            else grpc.insecure_channel(target, options=options)
        )
        return grpc.intercept_channel(channel, *interceptors) if interceptors else channel
    kinds = (_AddMetadataUU, _AddMetadataUS, _AddMetadataSU, _AddMetadataSS) if metadata else ()
    chain = [*interceptors, *(kind(metadata) for kind in kinds)]
    if tls:
        return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options, interceptors=chain or None)
    return grpc.aio.insecure_channel(target, options=options, interceptors=chain or None)
