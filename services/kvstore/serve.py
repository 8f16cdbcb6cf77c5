"""`pdserve serve kvstore`: the shared KV block store process."""

from __future__ import annotations

from pdserve.common import metrics, model_loader
from pdserve.common.engine import precision
from pdserve.common.kv.spec import KVSpec
from pdserve.common.server import add_health_and_reflection, bind, create_server, serve_until_stopped
from pdserve.common.transfer.transport import make_receiver, make_sender
from pdserve.kvstore.config import KVStoreConfig
from pdserve.kvstore.service import KVStoreService
from pdserve.kvstore.servicer import KVStoreServicer
from pdserve.kvstore.store import BlockStore
from pdserve.v1 import kvstore_pb2, kvstore_pb2_grpc

SERVICE = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name


def block_bytes_of(config: KVStoreConfig) -> int:
    """Bytes of one block of the workers' model, from its config.json alone (no weights, no torch)."""
    ref = model_loader.resolve(config.model or None, weights=False)
    mc = model_loader.text_config(ref)
    head_dim = mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"]
    kv_heads = mc.get("num_key_value_heads") or mc["num_attention_heads"]
    spec = KVSpec(
        ref.name,
        ref.weights_digest,
        mc["num_hidden_layers"],
        kv_heads,
        head_dim,
        config.block_size,
        precision.resolve(config.dtype).dtype,
    )
    return spec.block_bytes


def build(config: KVStoreConfig, block_bytes: int | None = None):
    block_bytes = block_bytes or block_bytes_of(config)
    capacity = config.capacity_blocks or max(1, int(config.capacity.gib * 2**30 // block_bytes))
    service = KVStoreService(
        BlockStore(capacity, block_bytes),
        make_receiver(config),
        make_sender(config),
        lease_s=config.lease_ms / 1000,
        transfer_timeout_s=config.transfer_timeout_s,
    )
    server = create_server(interceptors=[config.authenticator()])
    kvstore_pb2_grpc.add_KVStoreServicer_to_server(KVStoreServicer(service), server)
    metrics.watch_store(service.store)
    port = bind(server, config.host, config.port, config.server_credentials())
    return server, port, service


async def serve(config: KVStoreConfig) -> None:
    metrics_port = metrics.serve_prometheus(config.host, config.metrics_port, service="kvstore")
    if metrics_port is not None:
        print(f"kvstore metrics on http://{config.host}:{metrics_port}/metrics", flush=True)
    server, port, service = build(config)
    health = await add_health_and_reflection(server, [SERVICE])
    await service.start()
    await server.start()
    await health.set_serving(True)
    print(
        f"kvstore ({service.store.capacity} blocks of {service.store.block_bytes} bytes) "
        f"listening on {config.host}:{port}",
        flush=True,
    )
    try:
        await serve_until_stopped(server, grace_s=config.grace_s, health=health)
    finally:
        await service.aclose()
