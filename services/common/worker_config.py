"""Configuration shared by the model workers (prefill, decode, colocated)."""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from typing import Literal

from pdserve.common import affinity, memory
from pdserve.common.config import SettingError, option
from pdserve.common.engine.config import EngineConfig
from pdserve.common.logs import LogFormat
from pdserve.common.security import SecurityConfig


@dataclass(frozen=True)
class WorkerConfig(SecurityConfig):
    host: str = option("127.0.0.1", help="address the gRPC server listens on")
    port: int = option(50061, help="gRPC port (0: any free port)")
    worker_id: str = option("", help="unique id in logs and routing (default: hostname:port)")
    role: Literal["prefill", "decode", "colocated", "both"] = option(
        "decode", help="what this worker does (an elastic worker: its first role, prefill, decode or both)"
    )
    model: str = option(
        "", help="HF directory, .gguf file or hub id (org/name) (default: the bundled SmolLM2-135M-Instruct)"
    )
    device: str = option("cpu", help="torch device")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="weights and KV (auto: bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else float32)"
    )
    threads: int = option(
        0,
        help="torch CPU threads (0: one per core it may use: its --cpus, within a container's CPU limit, "
        "at most torch's default); give workers "
        "sharing a machine a share each, or their thread pools spin against each other",
    )
    cpus: str = option(
        "",
        help="cores the engine's step thread and torch's threads run on, e.g. 1 or 2-3 (empty: any); "
        "the gRPC side is not pinned. pdserve up gives each CPU worker cores of its own when they fit",
    )
    block_size: int = option(16, help="tokens per KV block")
    kv_cache_gib: float = option(0.0, help=f"KV pool size in GiB, unless --num-kv-blocks (0: {memory.WORKER_KV})")
    num_kv_blocks: int = option(0, help="KV pool size in blocks (0: from --kv-cache-gib)")
    max_num_seqs: int = option(64, help="running sequences at most")
    max_num_batched_tokens: int = option(512, help="tokens per step; the prefill chunk size")
    enable_chunked_prefill: bool = option(
        True,
        help="prefill long prompts a chunk per step between decode steps; "
        "off: each prompt in one step, which every running stream "
        "waits for (colocated serving without chunking)",
    )
    enable_prefix_caching: bool = option(True)
    pack_weights: bool = option(
        True,
        help="CPU: linear weights packed once into oneDNN's layout (off: torch's "
        "F.linear, which reorders them at every call)",
    )
    paged_kernel: bool = option(
        True,
        help="CPU: decode attention by pdserve's kernel, built once per machine with "
        "g++, reading KV blocks in place (off, or without g++: torch ops over "
        "gathered blocks)",
    )
    fused_layers: bool = option(
        True,
        help="CPU, Llama-family models: each layer as about ten ops (q/k/v and gate/up as one "
        "matmul each, pdserve's fused norm, RoPE and activation kernels); off, or without "
        "the kernels: transformers' modules",
    )
    quantization: Literal["none", "int8"] = option(
        "none",
        help="CPU: int8 weight-only linear layers (a scale per output channel; the LM head kept), "
        "half the bytes a decode step reads; prefill and large batches run slower than bf16",
    )
    max_queue: int = option(256, help="requests waiting at most; more get RESOURCE_EXHAUSTED")
    lease_ms: int = option(30_000, help="a KV reservation expires if unused this long")
    transfer_timeout_s: float = option(30.0, help="a KV transfer fails if not done this long after decode asks")
    kvstore: str = option("", help="KV store host:port; empty: no shared store")
    router: list[str] = option(default_factory=list, help="routers to register with and heartbeat to, host:port")
    advertise_host: str = option("", help="address routers use to reach this worker (default: --host)")
    advertise_kv_wire_version: int = option(
        0,
        help="KV wire version told to routers (0: the one this build speaks; "
        "another only to rehearse a mixed-version fleet)",
    )
    data_host: str = option(
        "",
        help="address the KV data plane (UCX) listens on, when KV must cross "
        "machines on another address than --host (default: --host)",
    )
    transport: Literal["ucx", "loopback"] = option("ucx", help="KV data plane (loopback: one process only, for tests)")
    warm_up: bool = option(
        True,
        help="run and time a few prompts before serving: pays first-call costs and seeds "
        "the speeds the router's cost model reads (off: a faster start)",
    )
    grace_s: float = option(10.0, help="on SIGTERM, seconds in-flight requests get to finish")
    metrics_port: int = option(9465, help="Prometheus /metrics port, on --host (0: any free port, -1: no metrics)")
    log_format: LogFormat = option("text", help="log lines as text or json (one object per line)")

    def validate(self) -> None:
        self.check_listen_ports()
        if self.threads < 0:
            raise SettingError("threads", "must be >= 0 (0: one per core the worker may use)")
        self.engine_cpus()
        self.check_size("kv_cache_gib", "num_kv_blocks")
        self.check_positive("max_queue", "lease_ms", "transfer_timeout_s")
        self.engine_config()  # validates the engine fields

    def torch_threads(self, default: int) -> int:
        """--threads, else one per core this worker may use, at most torch's `default` (one per
        physical core): torch sees neither --cpus nor a container's CPU limit, and a thread more
        than the cores spins against the others."""
        return self.threads or min(default, len(self.engine_cpus()) or affinity.usable_cores())

    def engine_cpus(self) -> list[int]:
        """--cpus as core ids ([]: not pinned); each must be one this process may run on."""
        if not self.cpus:
            return []
        try:
            cpus = affinity.parse(self.cpus)
        except ValueError as e:
            raise SettingError("cpus", str(e)) from None
        outside = sorted(set(cpus) - set(affinity.available()))
        if outside:
            raise SettingError("cpus", f"cores {outside} are not among this machine's {affinity.available()}")
        return cpus

    @functools.cached_property
    def kv_cache(self) -> memory.Sizing:
        """The KV pool's size: --kv-cache-gib, or chosen from free memory once per config."""
        return memory.WORKER_KV.choose(self.kv_cache_gib)

    def sizes(self) -> str:
        size = f"{self.num_kv_blocks} blocks (given)" if self.num_kv_blocks else self.kv_cache
        return f"KV cache {size}"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model or None,
            device=self.device,
            dtype=self.dtype,
            block_size=self.block_size,
            kv_cache_gib=self.kv_cache.gib,
            num_kv_blocks=self.num_kv_blocks or None,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_chunked_prefill=self.enable_chunked_prefill,
            enable_prefix_caching=self.enable_prefix_caching,
            pack_weights=self.pack_weights,
            paged_kernel=self.paged_kernel,
            fused_layers=self.fused_layers,
            quantization=self.quantization,
        )

    def resolved_worker_id(self, bound_port: int) -> str:
        return self.worker_id or f"{self.role}@{socket.gethostname()}:{bound_port}"
