"""`pdserve serve router`: the client-facing router process."""

from __future__ import annotations

import asyncio
import logging

from pdserve.common import metrics, model_loader, periodic
from pdserve.common.server import add_health_and_reflection, bind, create_server, serve_until_stopped
from pdserve.common.tokenizer import Tokenizer
from pdserve.router.config import RouterConfig
from pdserve.router.openai_http import OpenAIServer
from pdserve.router.request_metrics import RequestMetrics
from pdserve.router.router import Router
from pdserve.router.servicer import RouterServicer
from pdserve.router.shutdown import Shutdown
from pdserve.router.worker_pool import WorkerPool
from pdserve.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
# Calls beside the requests (max_inflight): health checks and their watches (open to anyone), worker
# registrations and heartbeats, ListWorkers. Each holds memory while open: a bound, not a budget.
OTHER_RPCS = 256


def load_tokenizer(model: str) -> tuple[Tokenizer, int]:
    """The workers' tokenizer and context window, from their files alone: no weights, no torch."""
    ref = model_loader.resolve(model or None, weights=False)
    window = model_loader.text_config(ref).get("max_position_embeddings")
    if not window:
        raise ValueError(f"{ref.path / 'config.json'}: no max_position_embeddings (the context window)")
    return Tokenizer.from_dir(ref.path), window


class RouterRuntime:
    def __init__(self, config: RouterConfig, tokenizer=None, max_model_len: int | None = None):
        if tokenizer is None:
            tokenizer, max_model_len = load_tokenizer(config.model)
        self.config = config
        self.pool = WorkerPool.connect(
            config.prefill_targets if config.mode == "disaggregated" else [],
            config.decode_targets,
            config.load_poll_s,
            security=config,
            keepalive_s=config.worker_keepalive_s,
        )
        self.pool.lease_ttl_s = config.worker_lease_s
        self.router = Router(
            tokenizer,
            self.pool,
            mode=config.mode,
            max_model_len=max_model_len,
            max_inflight=config.max_inflight,
            rpc_timeout_s=config.rpc_timeout_s,
            local_prefill=config.local_prefill,
            prefill_timeout_s=config.prefill_timeout_s,
            max_retries=config.max_retries,
        )
        self.balancer = None
        if (balancing := config.balancer()) is not None:
            from pdserve.router.role_balancer import RoleBalancer  # the planner: only when asked for

            self.balancer = RoleBalancer(self.pool, *balancing, threads=config.balance_threads)
            self.router.on_admitted = self.balancer.observe
        api_keys = config.load_api_keys()
        self.server = create_server(
            interceptors=[config.authenticator(api_keys)],
            maximum_concurrent_rpcs=config.max_inflight + OTHER_RPCS,  # beyond: RESOURCE_EXHAUSTED
        )
        metrics.watch_router(self.router)
        measured = RequestMetrics(config.slo_ttft_ms, config.slo_tpot_ms)
        self.shutdown = Shutdown(config.grace_s)  # both front ends: one drain refuses and cuts them
        router_pb2_grpc.add_RouterServicer_to_server(
            RouterServicer(self.router, config.default_max_tokens, measured, self.shutdown), self.server
        )
        self.port = bind(self.server, config.host, config.port, config.server_credentials())
        self.health = None
        self._health_task: asyncio.Task | None = None
        self._serving = False  # what health says: SERVING once the workers are reachable
        self.http = OpenAIServer(
            self.router,
            config.http_host or config.host,
            config.http_port,
            default_max_tokens=config.default_max_tokens,
            shutdown=self.shutdown,
            ready=self.pool.ready,
            api_keys=api_keys,
            allowed_origins=config.allowed_origins,
            ssl_context=config.ssl_context(),
            request_metrics=measured,
        )

    async def start(self, ready_timeout_s: float = 600.0) -> None:
        self.health = await add_health_and_reflection(self.server, [SERVICE])
        await self.pool.start()
        await self.http.start()  # before the workers are ready: /health says 503 until then
        await self.server.start()
        deadline = asyncio.get_running_loop().time() + ready_timeout_s
        while not self.pool.ready():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("workers did not become reachable")
            await asyncio.sleep(0.2)
            await self.pool.refresh()
        await self.health.set_serving(True)
        self._serving = True
        track = periodic.every(self.config.load_poll_s, self._track_health, "router-health")
        self._health_task = asyncio.create_task(track, name="router-health")
        if self.balancer:
            self.balancer.start()

    async def _track_health(self) -> None:
        """NOT_SERVING while no usable worker set is left, so probes and load
        balancers take this router out instead of sending it doomed requests."""
        ready = self.pool.ready()
        if ready != self._serving:
            self._serving = ready
            await self.health.set_serving(ready)

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        if self.balancer:
            await self.balancer.close()
        await self.shutdown.drain(grace_s=1.0)  # embedded (tests): as quick as the gRPC stop below
        await self.http.stop()
        await self.server.stop(grace=1)
        await self.pool.close()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or `stop`), then drain and stop."""
        await self.start()
        print(f"router ({self.config.mode}) listening on {self.config.host}:{self.port}", flush=True)
        if self.http.url:
            print(f"router OpenAI-compatible API on {self.http.url}", flush=True)
        try:
            # The drain takes the grace period and cuts what still runs, with a word to each
            # client; grpc's own stop then finds nothing left to cancel ("Cancelling all calls").
            await serve_until_stopped(
                self.server, grace_s=self.config.grace_s, health=self.health, stop=stop, on_shutdown=self.shutdown.drain
            )
        finally:
            if self.balancer:
                await self.balancer.close()
            await self.http.stop()
            await self.pool.close()


async def serve(config: RouterConfig) -> None:
    port = metrics.serve_prometheus(config.host, config.metrics_port, service="router")
    if port is not None:
        print(f"router metrics on http://{config.host}:{port}/metrics", flush=True)
    await RouterRuntime(config).run()
