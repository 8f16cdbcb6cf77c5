"""KV store configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdserve.common.config import option
from pdserve.common.logs import LogFormat
from pdserve.common.security import SecurityConfig


@dataclass(frozen=True)
class KVStoreConfig(SecurityConfig):
    host: str = option("127.0.0.1", help="address the gRPC server listens on")
    port: int = option(50070, help="gRPC port (0: any free port)")
    model: str = option("", help="the workers' model: fixes the block size in bytes (default: bundled SmolLM2)")
    dtype: Literal["float32", "float16", "bfloat16"] = option("float32")
    block_size: int = option(16, help="tokens per KV block, as on the workers")
    capacity_gib: float = option(2.0, help="memory for blocks (unless --capacity-blocks)")
    capacity_blocks: int = option(0, help="capacity in blocks (0: from --capacity-gib)")
    lease_ms: int = option(30_000, help="a write reservation expires if not committed this long")
    transfer_timeout_s: float = option(30.0)
    transport: Literal["ucx", "loopback"] = option("ucx")
    grace_s: float = option(5.0)
    metrics_port: int = option(9466, help="Prometheus /metrics port, on --host (0: any free port, -1: no metrics)")
    log_format: LogFormat = option("text", help="log lines as text or json (one object per line)")

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if not -1 <= self.metrics_port < 65536 or self.metrics_port == self.port != 0:
            raise ValueError("metrics_port must be in [0, 65535] and not the gRPC port, or -1 for no metrics")
        if self.capacity_gib <= 0 or self.capacity_blocks < 0 or self.block_size < 1:
            raise ValueError("capacity_gib, capacity_blocks and block_size must be positive")
