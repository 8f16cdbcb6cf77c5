"""Who may talk to a pdserve service: the settings of TLS, the internal token and API keys.

`SecurityConfig` holds them for every service, `ClientAuthConfig` adds the router's API keys; tls.py's
`dial()` and auth.py's checks and interceptor are re-exported here.
Why: docs/security.md (the three layers, "Threat model, in brief", "Settings").
"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc

from pdserve.common.auth import (
    AUTHORIZATION_KEY,
    OPEN_METHOD_PREFIXES,
    ROUTER_CLIENT_METHODS,
    TOKEN_KEY,
    ApiKeys,
    Authenticator,
    check_token,
)
from pdserve.common.config import CONFIG_DEST, ServiceConfig, option
from pdserve.common.tls import TLS, dial, read_file

__all__ = [
    "AUTHORIZATION_KEY",
    "OPEN",
    "OPEN_METHOD_PREFIXES",
    "ROUTER_CLIENT_METHODS",
    "TLS",
    "TOKEN_KEY",
    "ApiKeys",
    "Authenticator",
    "ClientAuthConfig",
    "SecurityConfig",
    "check_token",
    "dial",
    "from_environment",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecurityConfig(ServiceConfig):
    """TLS and internal-token settings every service's config inherits."""

    # False only for the router: its clients are end users, who need no certificate.
    peers_only: ClassVar[bool] = True

    tls_cert: str = option("", help="PEM certificate chain: serve TLS, and present it to peers (mTLS)")
    tls_key: str = option("", help="PEM private key of --tls-cert")
    tls_ca: str = option("", help="PEM CA bundle that signs peers' certificates (empty: system roots)")
    tls_require_client_cert: bool | None = option(
        None,
        help="refuse clients without a certificate signed by --tls-ca "
        "(unset: yes on prefill, decode and kvstore when --tls-ca is given; no on the router)",
    )
    tls_server_name: str = option("", help="name to verify in peers' certificates instead of their address")
    internal_token: str = option(
        "",
        secret=True,
        help="shared secret every worker-facing call must carry (set it through the environment or a file, not a flag)",
    )

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
                read_file(getattr(self, name), name)

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

    def dial(
        self,
        target: str,
        *,
        interceptors: Sequence[Any] = (),
        options: Sequence[tuple[str, Any]] = (),
        sync: bool = False,
    ) -> Any:
        """A channel to another pdserve service, with this service's credentials."""
        metadata = ((TOKEN_KEY, self.internal_token),) if self.internal_token else ()
        return dial(target, self.client_tls(), metadata=metadata, interceptors=interceptors, options=options, sync=sync)

    def authenticator(self) -> Authenticator:
        return Authenticator(internal_token=self.internal_token)


@dataclass(frozen=True)
class ClientAuthConfig(SecurityConfig):
    """SecurityConfig plus the API keys of a service that end users call (the router)."""

    peers_only: ClassVar[bool] = False

    api_keys: list[str] = option(
        default_factory=list,
        secret=True,
        help="API keys clients must send (env: comma-separated; prefer --api-keys-file)",
    )
    api_keys_file: str = option("", help="file of API keys, one per line (# comments); with --api-keys: either works")

    def validate_security(self) -> None:
        super().validate_security()
        if self.api_keys_file and not self.load_api_keys():
            raise ValueError(
                f"api_keys_file: {self.api_keys_file} holds no keys (an empty file would leave the router open)"
            )

    def _raw_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file:
            for line in read_file(self.api_keys_file, "api_keys_file").decode().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys

    def load_api_keys(self) -> ApiKeys:
        return ApiKeys(self._raw_api_keys())

    def own_api_key(self) -> str:
        """A key the launcher's own calls to the router it started may send ("": none needed)."""
        return next(iter(self._raw_api_keys()), "")

    def authenticator(self, api_keys: ApiKeys | None = None) -> Authenticator:
        api_keys = self.load_api_keys() if api_keys is None else api_keys
        if api_keys and not self.internal_token:
            log.warning(
                "API keys are set but internal_token is not: anyone who reaches the router can "
                "register a worker with it (set PDSERVE_INTERNAL_TOKEN on the router and workers)"
            )
        return Authenticator(
            internal_token=self.internal_token, api_keys=api_keys, client_methods=ROUTER_CLIENT_METHODS
        )


OPEN = SecurityConfig()  # no TLS, no token: the laptop default


def from_environment(environ: Mapping[str, str]) -> ClientAuthConfig:
    """The PDSERVE_TLS_* / PDSERVE_INTERNAL_TOKEN / PDSERVE_API_KEYS* settings of an
    environment, for tools that dial services they did not configure (`pdserve up`)."""
    return ClientAuthConfig.from_cli_args(
        argparse.Namespace(), {k: v for k, v in environ.items() if k != SecurityConfig.env_name(CONFIG_DEST)}
    )
