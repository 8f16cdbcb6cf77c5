"""KV store configuration."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from pdserve.common import memory
from pdserve.common.config import option
from pdserve.common.logs import LogFormat
from pdserve.common.security import SecurityConfig


@dataclass(frozen=True)
class KVStoreConfig(SecurityConfig):
    host: str = option("127.0.0.1", help="address the gRPC server listens on")
    port: int = option(50070, help="gRPC port (0: any free port)")
    data_host: str = option(
        "",
        help="address the KV data plane (UCX) listens on, when KV must cross "
        "machines on another address than --host (default: --host)",
    )
    model: str = option("", help="the workers' model: fixes the block size in bytes (default: bundled SmolLM2)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="the workers' KV dtype (auto: as a CPU worker on this machine resolves it)"
    )
    block_size: int = option(16, help="tokens per KV block, as on the workers")
    capacity_gib: float = option(0.0, help=f"memory for blocks, unless --capacity-blocks (0: {memory.STORE_CAPACITY})")
    capacity_blocks: int = option(0, help="capacity in blocks (0: from --capacity-gib)")
    lease_ms: int = option(30_000, help="a write reservation expires if not committed this long")
    transfer_timeout_s: float = option(30.0)
    transport: Literal["ucx", "loopback"] = option("ucx")
    grace_s: float = option(5.0)
    metrics_port: int = option(9466, help="Prometheus /metrics port, on --host (0: any free port, -1: no metrics)")
    log_format: LogFormat = option("text", help="log lines as text or json (one object per line)")

    def validate(self) -> None:
        self.check_listen_ports()
        self.check_size("capacity_gib", "capacity_blocks")
        self.check_positive("block_size", "lease_ms", "transfer_timeout_s")

    @functools.cached_property
    def capacity(self) -> memory.Sizing:
        """The store's size: --capacity-gib, or chosen from free memory once per config."""
        return memory.STORE_CAPACITY.choose(self.capacity_gib)

    def sizes(self) -> str:
        size = f"{self.capacity_blocks} blocks (given)" if self.capacity_blocks else self.capacity
        return f"capacity {size}"
