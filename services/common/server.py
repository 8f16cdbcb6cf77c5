"""The grpc.aio server every pdserve service runs on, with health and reflection.

`create_server()` maps pdserve's exceptions to gRPC status codes, `bind()` listens (TLS when given
credentials), `serve_until_stopped()` drains on SIGTERM.
A service's main, step by step: docs/architecture.md ("A service's main").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import OVERALL_HEALTH
from grpc_health.v1.health import aio as health_aio

from pdserve.common import grpc_tracing, tracing

# Re-exported: services and tests import the error mapping from here too.
from pdserve.common.grpc_errors import ErrorMappingInterceptor
from pdserve.common.ports import host_port

__all__ = [
    "DEFAULT_OPTIONS",
    "INSTANCE_ID_ENV",
    "INSTANCE_ID_KEY",
    "Health",
    "add_health_and_reflection",
    "add_health_service",
    "add_reflection",
    "bind",
    "create_server",
    "serve_until_stopped",
]

log = logging.getLogger(__name__)

DEFAULT_OPTIONS: dict[str, Any] = {
    "grpc.max_send_message_length": 64 * 2**20,
    "grpc.max_receive_message_length": 64 * 2**20,
    # Fail fast when the port is taken instead of silently sharing it.
    "grpc.so_reuseport": 0,
    # Find clients that vanished without closing (dead router, cut network),
    # so their streams are cancelled and the KV leases they hold freed.
    "grpc.keepalive_time_ms": 20_000,
    "grpc.keepalive_timeout_ms": 10_000,
    # Let callers ping as often as each second (the router pings workers mid-call): at gRPC's
    # default of 5 minutes, pings during a silent unary call (a long prefill) earn a GOAWAY.
    "grpc.http2.min_ping_interval_without_data_ms": 1_000,
}


def create_server(
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: dict[str, Any] | None = None,
    maximum_concurrent_rpcs: int | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with the error mapping outermost, then tracing (a
    span per call, continuing the caller's trace; only if this process traces
    when the server is made, i.e. after tracing.setup()), then `interceptors`.

    Inner interceptors still see the original exception; `options` override
    DEFAULT_OPTIONS key by key.
    """
    merged = {**DEFAULT_OPTIONS, **(options or {})}
    return grpc.aio.server(
        interceptors=[
            ErrorMappingInterceptor(),
            *([grpc_tracing.ServerInterceptor()] if tracing.enabled() else []),
            *interceptors,
        ],
        options=list(merged.items()),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )


def bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on host:port (0: any free port) and return the bound port; TLS
    with `credentials` (pdserve.common.security.SecurityConfig.server_credentials())."""
    address = host_port(host, port)
    bound = (
        server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    )
    if bound == 0:  # older grpcio reports failure this way instead of raising
        raise RuntimeError(f"cannot listen on {address}")
    return bound


# Who answers a health check: the token `pdserve up` gives each process it starts (else one
# of our own), in the answer's trailing metadata, so the launcher counts only its own
# services ready, never another process on the same port.
INSTANCE_ID_ENV = "PDSERVE_INSTANCE_ID"
INSTANCE_ID_KEY = "pdserve-instance-id"


class Health(health_aio.HealthServicer):
    """grpc.health.v1.Health (asyncio) that remembers which names it reports,
    and says in each Check answer which process it is."""

    def __init__(self, services: Iterable[str] = ()) -> None:
        super().__init__()
        self.services = (OVERALL_HEALTH, *services)
        self.instance_id = os.environ.get(INSTANCE_ID_ENV) or uuid.uuid4().hex

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        context.set_trailing_metadata(((INSTANCE_ID_KEY, self.instance_id),))
        return await super().Check(request, context)

    async def set_serving(self, serving: bool) -> None:
        """Report the server ("") and every named service (NOT_)SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services:
            await self.set(name, status)


async def add_health_service(server: grpc.aio.Server, services: Iterable[str] = ()) -> Health:
    """Register the standard health service, NOT_SERVING until the service
    calls `set_serving(True)` (e.g. once its model is loaded)."""
    health = Health(services)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set_serving(False)
    return health


def add_reflection(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Register server reflection (grpc.reflection.v1alpha) for these fully
    qualified service names, plus health and reflection themselves."""
    from grpc_reflection.v1alpha import reflection

    health = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*services, health, reflection.SERVICE_NAME), server)


async def add_health_and_reflection(server: grpc.aio.Server, services: Sequence[str]) -> Health:
    """Health (NOT_SERVING for "" and each name until set_serving) and reflection."""
    add_reflection(server, services)
    return await add_health_service(server, services)


async def serve_until_stopped(
    server: grpc.aio.Server,
    *,
    grace_s: float,
    health: Health | None = None,
    stop: asyncio.Event | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Serve until a signal (or `stop`), then shut down gracefully.

    Order matters: health goes NOT_SERVING first so probes and balancers stop
    sending work, then `on_shutdown` (e.g. deregister from the router), then
    the server refuses new RPCs and gives running ones `grace_s` to finish
    before cancelling them (cancellation frees their KV leases). grpc's own
    cut says only "Cancelling all calls"; the router's `on_shutdown` is its
    drain (pdserve.router.shutdown), which ends its streams first, with a word.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        # Shielded: cancelling a wait_for_termination() cancels the server's
        # own shutdown future, and stop() below would then fail.
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.shield(server.wait_for_termination())}
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        log.info("shutting down (grace %.1fs)", grace_s)
        if health is not None:
            await health.enter_graceful_shutdown()
        if on_shutdown is not None:
            await on_shutdown()
        await server.stop(grace_s)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
