"""Who may talk to a pdserve service, and how every channel is opened.

Three layers, each off by default (a laptop suite on localhost is open):

- TLS / mutual TLS on every gRPC server and channel: `SecurityConfig.tls_*`
  (PEM files). A service with `tls_cert` + `tls_key` serves TLS and dials its
  peers over TLS, verifying them against `tls_ca` and presenting its own
  certificate, so the same files give mTLS in both directions. Worker-facing
  services (prefill, decode, kvstore) require a client certificate signed by
  `tls_ca` whenever a CA is set; the router only if told to (its clients are
  users with API keys).
- An internal token (`internal_token`, metadata `pdserve-internal-token`):
  every call to a worker-facing method must carry it, so even without TLS a
  stranger on the network cannot read KV blocks, submit prefills or register
  a rogue worker with the router.
- API keys on the router's client-facing methods (`authorization: Bearer`),
  checked here for gRPC and by the HTTP server with `ApiKeys.check`.

`dial()` is the one function that opens a client channel; services call it
through `SecurityConfig.dial`, the SDK and launcher with a `TLS` of their own.
Refusals raise `UnauthenticatedError`, which the server's error mapping turns
into UNAUTHENTICATED (HTTP: 401). docs/security.md has the threat model.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc

from pdserve.common.config import CONFIG_DEST, ServiceConfig, option
from pdserve.common.errors import UnauthenticatedError
from pdserve.common.grpc_handlers import wrap_handler

log = logging.getLogger(__name__)

TOKEN_KEY = "pdserve-internal-token"
AUTHORIZATION_KEY = "authorization"
# Probes and tooling: answer without credentials (TLS still applies).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The router's methods for end users; its other methods (RegisterWorker,
# Heartbeat, DeregisterWorker) are worker-facing.
ROUTER_CLIENT_METHODS = frozenset({"/pdserve.v1.Router/Generate", "/pdserve.v1.Router/ListWorkers"})


def _read(path: str, what: str) -> bytes:
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
            root_certificates=_read(self.ca, "tls_ca") if self.ca else None,
            private_key=_read(self.key, "tls_key") if self.key else None,
            certificate_chain=_read(self.cert, "tls_cert") if self.cert else None)

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(_read(self.key, "tls_key"), _read(self.cert, "tls_cert"))],
            root_certificates=_read(self.ca, "tls_ca") if self.ca else None,
            require_client_auth=require_client_cert)


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


def dial(target: str, tls: TLS | None = None, *, metadata: Sequence[tuple[str, str]] = (),
         interceptors: Sequence[Any] = (), options: Sequence[tuple[str, Any]] = (),
         sync: bool = False) -> Any:
    """Open a channel to `target`: TLS when `tls` is given, `metadata` (e.g. the
    internal token) on every call, then `interceptors` (e.g. tracing).
    A grpc.aio.Channel, or a blocking grpc.Channel with sync=True."""
    options = [*options, *(tls.channel_options() if tls else ())]
    if sync:  # tools polling health (open methods): no per-call metadata needed
        if metadata:
            raise ValueError("dial: per-call metadata needs an aio channel")
        channel = (grpc.secure_channel(target, tls.channel_credentials(), options=options) if tls
                   else grpc.insecure_channel(target, options=options))
        return grpc.intercept_channel(channel, *interceptors) if interceptors else channel
    kinds = (_AddMetadataUU, _AddMetadataUS, _AddMetadataSU, _AddMetadataSS) if metadata else ()
    chain = [*interceptors, *(kind(metadata) for kind in kinds)]
    if tls:
        return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options,
                                       interceptors=chain or None)
    return grpc.aio.insecure_channel(target, options=options, interceptors=chain or None)


class ApiKeys:
    """The router's API keys, kept as SHA-256 digests and compared in constant
    time (every key is compared, whatever matches). Empty: no key required."""

    def __init__(self, keys: Iterable[str] = ()):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise UnauthenticatedError unless `authorization` is "Bearer <a key>"."""
        if not self._digests:
            return
        if not authorization:
            raise UnauthenticatedError("missing API key: send the header `authorization: Bearer <key>`")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise UnauthenticatedError("malformed authorization: expected `Bearer <key>`")
        given = hashlib.sha256(key.strip().encode()).digest()
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise UnauthenticatedError("invalid API key")


def check_token(expected: str, given: str | None) -> None:
    """Raise UnauthenticatedError unless `given` is the internal token (constant time)."""
    if not expected:
        return
    if not given:
        raise UnauthenticatedError(f"missing internal token (metadata {TOKEN_KEY}): "
                                   "this method serves pdserve services only")
    if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()):
        raise UnauthenticatedError("invalid internal token")


class Authenticator(grpc.aio.ServerInterceptor):
    """Refuses calls without the credentials their method needs: API keys for
    `client_methods`, the internal token for every other method but health and
    reflection. A refused call never reaches its servicer."""

    def __init__(self, *, internal_token: str = "", api_keys: ApiKeys | None = None,
                 client_methods: Collection[str] = ()):
        self.internal_token, self.api_keys = internal_token, api_keys or ApiKeys()
        self.client_methods = frozenset(client_methods)

    def check(self, method: str, metadata: dict[str, Any]) -> None:
        if method.startswith(OPEN_METHOD_PREFIXES):
            return
        if method in self.client_methods:
            self.api_keys.check(_text(metadata.get(AUTHORIZATION_KEY)))
        else:
            check_token(self.internal_token, _text(metadata.get(TOKEN_KEY)))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        try:
            self.check(details.method, dict(details.invocation_metadata or ()))
        except UnauthenticatedError as refusal:
            return _refusing(handler, refusal)
        return handler


def _text(value: str | bytes | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _refusing(handler: grpc.RpcMethodHandler, refusal: UnauthenticatedError) -> grpc.RpcMethodHandler:
    """A handler of the same kind that raises `refusal` (the error mapping,
    outermost, answers UNAUTHENTICATED)."""
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise refusal

    return wrap_handler(handler, lambda _: refuse, lambda _: refuse, handler.request_deserializer)


@dataclass(frozen=True)
class SecurityConfig(ServiceConfig):
    """TLS and internal-token settings every service's config inherits."""

    # False only for the router: its clients are end users, who need no certificate.
    peers_only: ClassVar[bool] = True

    tls_cert: str = option("", help="PEM certificate chain: serve TLS, and present it to peers (mTLS)")
    tls_key: str = option("", help="PEM private key of --tls-cert")
    tls_ca: str = option("", help="PEM CA bundle that signs peers' certificates (empty: system roots)")
    tls_require_client_cert: bool | None = option(
        None, help="refuse clients without a certificate signed by --tls-ca "
                   "(unset: yes on prefill, decode and kvstore when --tls-ca is given; no on the router)")
    tls_server_name: str = option("", help="name to verify in peers' certificates instead of their address")
    internal_token: str = option("", secret=True, help="shared secret every worker-facing call must carry "
                                 "(set it through the environment or a file, not a flag)")

    def __post_init__(self) -> None:
        self.validate_security()
        super().__post_init__()  # the service's own validate()

    def validate_security(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key: give both or neither")
        if self.tls_require_client_cert and not (self.tls_cert and self.tls_ca):
            raise ValueError("tls_require_client_cert needs tls_cert, tls_key and tls_ca")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            if getattr(self, name):
                _read(getattr(self, name), name)

    @property
    def tls_enabled(self) -> bool:
        """TLS on this service's server and on the channels it opens."""
        return bool(self.tls_cert or self.tls_ca)

    @property
    def require_client_cert(self) -> bool:
        if self.tls_require_client_cert is not None:
            return self.tls_require_client_cert
        return self.peers_only and bool(self.tls_cert and self.tls_ca)

    def client_tls(self) -> TLS | None:
        if not self.tls_enabled:
            return None
        return TLS(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key, server_name=self.tls_server_name)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls_cert:
            return None
        return TLS(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key).server_credentials(self.require_client_cert)

    def ssl_context(self) -> ssl.SSLContext | None:
        """For an HTTP server of this service (the router's OpenAI API): HTTPS
        with the same certificate, and client certificates as on gRPC."""
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_ca:
            context.load_verify_locations(self.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_NONE
        return context

    def dial(self, target: str, *, interceptors: Sequence[Any] = (), options: Sequence[tuple[str, Any]] = (),
             sync: bool = False) -> Any:
        """A channel to another pdserve service, with this service's credentials."""
        metadata = ((TOKEN_KEY, self.internal_token),) if self.internal_token else ()
        return dial(target, self.client_tls(), metadata=metadata, interceptors=interceptors,
                    options=options, sync=sync)

    def authenticator(self) -> Authenticator:
        return Authenticator(internal_token=self.internal_token)


@dataclass(frozen=True)
class ClientAuthConfig(SecurityConfig):
    """SecurityConfig plus the API keys of a service that end users call (the router)."""

    peers_only: ClassVar[bool] = False

    api_keys: list[str] = option(default_factory=list, secret=True,
                                 help="API keys clients must send (env: comma-separated; prefer --api-keys-file)")
    api_keys_file: str = option("", help="file of API keys, one per line (# comments); with --api-keys: either works")

    def validate_security(self) -> None:
        super().validate_security()
        if self.api_keys_file and not self.load_api_keys():
            raise ValueError(f"api_keys_file: {self.api_keys_file} holds no keys "
                             "(an empty file would leave the router open)")

    def load_api_keys(self) -> ApiKeys:
        keys = list(self.api_keys)
        if self.api_keys_file:
            for line in _read(self.api_keys_file, "api_keys_file").decode().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return ApiKeys(keys)

    def authenticator(self, api_keys: ApiKeys | None = None) -> Authenticator:
        api_keys = self.load_api_keys() if api_keys is None else api_keys
        if api_keys and not self.internal_token:
            log.warning("API keys are set but internal_token is not: anyone who reaches the router can "
                        "register a worker with it (set PDSERVE_INTERNAL_TOKEN on the router and workers)")
        return Authenticator(internal_token=self.internal_token, api_keys=api_keys,
                             client_methods=ROUTER_CLIENT_METHODS)


OPEN = SecurityConfig()  # no TLS, no token: the laptop default


def from_environment(environ: Mapping[str, str]) -> SecurityConfig:
    """The PDSERVE_TLS_* / PDSERVE_INTERNAL_TOKEN settings of an environment,
    for tools that dial services they did not configure (`pdserve up`)."""
    return SecurityConfig.from_cli_args(argparse.Namespace(), {k: v for k, v in environ.items()
                                                               if k != SecurityConfig.env_name(CONFIG_DEST)})
