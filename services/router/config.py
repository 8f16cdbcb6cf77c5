"""Router configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdserve.common.config import option
from pdserve.common.logs import LogFormat
from pdserve.common.security import ClientAuthConfig


@dataclass(frozen=True)
class RouterConfig(ClientAuthConfig):
    host: str = option("127.0.0.1", help="address the gRPC server listens on")
    port: int = option(50051, help="client-facing gRPC port")
    http_host: str = option("", help="address the OpenAI-compatible HTTP server listens on (empty: same as host)")
    http_port: int = option(8000, help="OpenAI-compatible HTTP port (0: any free port, -1: no HTTP server)")
    mode: Literal["disaggregated", "colocated"] = option("disaggregated")
    prefill_targets: list[str] = option(default_factory=list, help="prefill workers: host:port, or dns:NAME:PORT for "
                                        "every address NAME resolves to, looked up at each load poll (or let them "
                                        "register)")
    decode_targets: list[str] = option(default_factory=list, help="decode (or colocated) workers, as --prefill-targets")
    model: str = option("", help="the workers' model, for the tokenizer (default: bundled SmolLM2)")
    local_prefill: Literal["auto", "always", "never"] = option(
        "auto", help="disaggregated mode: let the decode worker prefill when the cost model says it is faster")
    max_inflight: int = option(256, help="requests in flight at most; more get RESOURCE_EXHAUSTED")
    default_max_tokens: int = option(256, help="max_tokens when a request leaves it unset")
    load_poll_s: float = option(0.5, help="how often worker loads are refreshed (and registered workers heartbeat)")
    worker_lease_s: float = option(5.0, help="a registered worker silent this long leaves the registry")
    rpc_timeout_s: float = option(600.0, help="deadline of each downstream call (cut to the client's own deadline)")
    prefill_timeout_s: float = option(120.0, help="a Prefill call slower than this fails over to another worker")
    worker_keepalive_s: float = option(
        10.0, help="ping a worker this often while calls to it are open; one silent as long again fails "
                   "them over (a hung process or a cut link sends no reset)")
    max_retries: int = option(2, help="failed attempts a request may retry (on other workers) before it errors")
    grace_s: float = option(10.0, help="on SIGTERM, seconds in-flight requests get to finish")
    metrics_port: int = option(9464, help="Prometheus /metrics port, on --host (0: any free port, -1: no metrics)")
    slo_ttft_ms: float = option(1000.0, help="time-to-first-token objective counted in pdserve_slo_requests (0: none)")
    slo_tpot_ms: float = option(100.0, help="time-per-output-token objective counted in pdserve_slo_requests (0: none)")
    log_format: LogFormat = option("text", help="log lines as text or json (one object per line)")

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port must be in [0, 65535]")
        if not -1 <= self.http_port < 65536:
            raise ValueError("http_port must be in [0, 65535], or -1 to disable HTTP")
        if self.http_port == self.port != 0 and self.http_host in ("", self.host):
            raise ValueError("http_port: the gRPC server already listens on this port")
        if not -1 <= self.metrics_port < 65536 or 0 < self.metrics_port in (self.port, self.http_port):
            raise ValueError("metrics_port must be in [0, 65535], not the gRPC or HTTP port, or -1 for no metrics")
        if self.slo_ttft_ms < 0 or self.slo_tpot_ms < 0:
            raise ValueError("slo_ttft_ms and slo_tpot_ms must be >= 0")
        # Empty target lists are fine: workers started with --router register themselves.
        from pdserve.router.worker_pool import split_dns_target

        for target in self.prefill_targets + self.decode_targets:
            split_dns_target(target)  # raises ValueError for a malformed dns: target
        if self.max_retries < 0 or min(self.prefill_timeout_s, self.rpc_timeout_s, self.worker_keepalive_s) <= 0:
            raise ValueError("max_retries must be >= 0; prefill_timeout_s, rpc_timeout_s and worker_keepalive_s "
                             "positive")
        if self.max_inflight < 1 or self.default_max_tokens < 1 or self.load_poll_s <= 0:
            raise ValueError("max_inflight, default_max_tokens and load_poll_s must be positive")
