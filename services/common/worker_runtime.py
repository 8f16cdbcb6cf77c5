"""What every model worker process does around its servicer.

Load the model and the engine, open the gRPC server with health, choose the
KV transport, serve until SIGTERM, drain. Prefill and decode differ only in
the worker object and servicer they add (see their serve.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from functools import partial

import torch

from pdserve.common import convert, metrics
from pdserve.common.engine.async_engine import AsyncEngine
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.kv.spec import WIRE_VERSION
from pdserve.common.ports import host_port
from pdserve.common.registration import Registration
from pdserve.common.server import add_health_and_reflection, bind, create_server, serve_until_stopped
from pdserve.common.version import software_version
from pdserve.common.worker_config import WorkerConfig
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2, prefill_pb2

# The gRPC service a worker of each role serves (for health and reflection).
SERVICES = {
    "prefill": prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name,
    "decode": decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name,
    "colocated": decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name,
}

log = logging.getLogger(__name__)


class WorkerRuntime:
    def __init__(self, config: WorkerConfig, engine: LLMEngine | None = None):
        self.config = config
        torch.set_num_threads(config.torch_threads(torch.get_num_threads()))
        self.engine = AsyncEngine(engine or partial(LLMEngine, config.engine_config()), config.engine_cpus())
        self.server = create_server(interceptors=[config.authenticator()])
        self.port = bind(self.server, config.host, config.port, config.server_credentials())
        self.worker_id = config.resolved_worker_id(self.port)
        spec = self.engine.spec
        self.info = pb.WorkerInfo(
            worker_id=self.worker_id,
            role=convert.ROLES[config.role],
            address=host_port(config.advertise_host or config.host, self.port),
            model=spec.model_name,
            kv_spec=convert.kv_spec_to_pb(spec),
            instance_id=uuid.uuid4().hex,
            software_version=software_version(),
            kv_wire_version=config.advertise_kv_wire_version or WIRE_VERSION,
        )
        self.role = config.role  # an elastic worker's changes (set_role)
        self.services = [SERVICES[config.role]] if config.role in SERVICES else []  # health and reflection
        self.health = None
        self.registration = Registration(config.router, self.load_response, security=config)
        self.labels = {"worker_id": self.worker_id, "role": config.role}  # the metrics' (set_role changes it)
        metrics.watch_engine(self.engine, self.labels)

    def load_response(self) -> pb.GetLoadResponse:
        eng = self.engine
        load = convert.load_to_pb(
            self.worker_id, self.role, eng.stats(), eng.waiting_tokens(), eng.step_ms_ewma, eng.prefill_tps_ewma
        )
        return pb.GetLoadResponse(info=self.info, load=load)

    def set_role(self, role: str, epoch: int) -> None:
        self.role = self.labels["role"] = role
        self.info.role = convert.ROLES[role]
        self.info.role_epoch = epoch

    async def start(self) -> None:
        self.health = await add_health_and_reflection(self.server, self.services)
        if self.config.warm_up:
            self.engine.warm_up()
        await self.engine.start()
        await self.server.start()
        await self.health.set_serving(True)
        self.registration.start()
        log.info("%s serving %s on %s:%d", self.worker_id, self.info.model, self.config.host, self.port)

    async def run(
        self, stop: asyncio.Event | None = None, on_shutdown: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Start, serve until SIGTERM/SIGINT (or `stop`), then shut down in order."""
        port = metrics.serve_prometheus(
            self.config.host, self.config.metrics_port, service=self.config.role, instance=self.worker_id
        )
        if port is not None:
            print(f"{self.worker_id} metrics on http://{host_port(self.config.host, port)}/metrics", flush=True)
        await self.start()
        print(
            f"{self.worker_id} ({self.config.role}) {self.engine.describe()}, "
            f"listening on {self.config.host}:{self.port}",
            flush=True,
        )
        try:
            await serve_until_stopped(
                self.server,
                grace_s=self.config.grace_s,
                health=self.health,
                stop=stop,
                on_shutdown=self.registration.stop,
            )  # new requests go elsewhere
        finally:
            if on_shutdown:
                await on_shutdown()
            await self.engine.stop()
