"""Who may call which method: the internal token, the router's API keys, and
`Authenticator`, the server interceptor that checks them before any servicer."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

import grpc

from pdserve.common.errors import UnauthenticatedError
from pdserve.common.grpc_handlers import wrap_handler

TOKEN_KEY = "pdserve-internal-token"
AUTHORIZATION_KEY = "authorization"
# Probes and tooling: answer without credentials (TLS still applies).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The router's methods for end users; its other methods (RegisterWorker,
# Heartbeat, DeregisterWorker) are worker-facing.
ROUTER_CLIENT_METHODS = frozenset({"/pdserve.v1.Router/Generate", "/pdserve.v1.Router/ListWorkers"})


def bearer(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `api_key` to the router (none for no key)."""
    return ((AUTHORIZATION_KEY, f"Bearer {api_key}"),) if api_key else ()


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
        raise UnauthenticatedError(
            f"missing internal token (metadata {TOKEN_KEY}): this method serves pdserve services only"
        )
    if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()):
        raise UnauthenticatedError("invalid internal token")


class Authenticator(grpc.aio.ServerInterceptor):
    """Refuses calls without the credentials their method needs: API keys for
    `client_methods`, the internal token for every other method but health and
    reflection. A refused call never reaches its servicer."""

    def __init__(
        self, *, internal_token: str = "", api_keys: ApiKeys | None = None, client_methods: Collection[str] = ()
    ):
        self.internal_token = internal_token
        self.api_keys = api_keys or ApiKeys()
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
