"""The null engine: a Decode service that streams fixed tokens without a model.

For `pdserve bench control-plane`: a router in front of it does its usual work, the worker next to nothing.
It serves what a colocated router calls; Reserve and Decode answer UNIMPLEMENTED (docs/benchmarks.md).
Run it as a process: `python -m pdserve.bench.null_worker --port 50061`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from pdserve.common.config import ServiceConfig, option
from pdserve.common.ports import host_port
from pdserve.common.server import add_health_service, bind, create_server, serve_until_stopped
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import decode_pb2_grpc

# " null engine token" in SmolLM2's vocabulary: readable when detokenized.
FIXED_TOKENS = (10034, 2327, 9624)
DEFAULT_MAX_TOKENS = 256
KV_SPEC = pb.KVSpec(
    model_name="null",
    num_layers=1,
    num_kv_heads=1,
    head_dim=1,
    block_size=16,
    dtype="float32",
    fingerprint=b"null-engine-v1\0\0",
)


def fixed_tokens(n: int) -> list[int]:
    """The token ids the null engine streams for max_tokens=n."""
    return [FIXED_TOKENS[i % len(FIXED_TOKENS)] for i in range(n)]


@dataclass(frozen=True)
class NullWorkerConfig(ServiceConfig):
    host: str = option("127.0.0.1", help="address the gRPC server listens on")
    port: int = option(50061, help="gRPC port (0: any free port)")
    worker_id: str = option("null-0", help="id in the router's routing and logs")
    token_interval_ms: float = option(0.0, help="pause between tokens (0: stream as fast as gRPC goes)")
    grace_s: float = option(1.0, help="on SIGTERM, seconds in-flight streams get to finish")

    def validate(self) -> None:
        if not 0 <= self.port < 65536 or self.token_interval_ms < 0:
            raise ValueError("port must be in [0, 65535] and token_interval_ms >= 0")


class NullDecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, info: pb.WorkerInfo, token_interval_s: float):
        self.info = info
        self.token_interval_s = token_interval_s
        self.running = self.completed = self.tokens = 0

    async def Generate(self, request: dpb.LocalGenerateRequest, context):
        s = request.sampling
        n = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        tokens = fixed_tokens(max(1, n))
        self.running += 1
        try:
            for token in tokens[:-1]:
                yield dpb.DecodeResponse(token_ids=[token])
                if self.token_interval_s:
                    await asyncio.sleep(self.token_interval_s)
            self.completed += 1
            self.tokens += len(tokens)
            # As a real worker: the last token comes with the finish reason and usage.
            yield dpb.DecodeResponse(
                token_ids=[tokens[-1]],
                finish_reason=pb.FINISH_REASON_LENGTH,
                usage=pb.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(tokens)),
            )
        finally:
            self.running -= 1

    async def Release(self, request: dpb.ReleaseRequest, context) -> dpb.ReleaseResponse:
        return dpb.ReleaseResponse(released=False)  # nothing is ever held

    async def GetLoad(self, request: pb.GetLoadRequest, context) -> pb.GetLoadResponse:
        load = pb.WorkerLoad(
            worker_id=self.info.worker_id,
            role=self.info.role,
            running_seqs=self.running,
            free_blocks=1 << 20,
            total_blocks=1 << 20,
            measured_at_unix_ms=int(time.time() * 1000),
        )
        return pb.GetLoadResponse(info=self.info, load=load)

    async def GetStats(self, request: dpb.GetDecodeStatsRequest, context) -> dpb.GetDecodeStatsResponse:
        return dpb.GetDecodeStatsResponse(requests_completed=self.completed, tokens_generated=self.tokens)


class NullWorker:
    """The server; `port` is the bound one (config port 0: any free port)."""

    def __init__(self, config: NullWorkerConfig):
        self.config = config
        self.server = create_server()
        self.port = bind(self.server, config.host, config.port)
        info = pb.WorkerInfo(
            worker_id=config.worker_id,
            role=pb.WORKER_ROLE_COLOCATED,
            address=host_port(config.host, self.port),
            model="null",
            kv_spec=KV_SPEC,
            instance_id=uuid.uuid4().hex,
        )
        self.servicer = NullDecodeServicer(info, config.token_interval_ms / 1000)
        decode_pb2_grpc.add_DecodeServicer_to_server(self.servicer, self.server)
        self.health = None

    async def start(self) -> None:
        self.health = await add_health_service(self.server)
        await self.server.start()
        await self.health.set_serving(True)

    async def aclose(self) -> None:
        await self.server.stop(grace=0)

    async def run(self) -> None:
        await self.start()
        print(f"null worker {self.config.worker_id} listening on {self.config.host}:{self.port}", flush=True)
        await serve_until_stopped(self.server, grace_s=self.config.grace_s, health=self.health)


async def serve(config: NullWorkerConfig) -> None:
    await NullWorker(config).run()  # made on the running loop: grpc.aio servers belong to one


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(NullWorkerConfig.from_argv(argv, prog="python -m pdserve.bench.null_worker")))


if __name__ == "__main__":
    main()
