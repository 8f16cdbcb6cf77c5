"""Router configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pdserve.common.config import SettingError, option
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
        self.check_port("port")
        # The HTTP server may share the gRPC port number only on another address.
        self.check_port("http_port", off=True, taken=[self.port] if self.http_host in ("", self.host) else [])
        self.check_port("metrics_port", off=True, taken=[self.port, self.http_port])
        for name in ("slo_ttft_ms", "slo_tpot_ms", "max_retries"):
            if getattr(self, name) < 0:
                raise SettingError(name, "must be >= 0")
        # Empty target lists are fine: workers started with --router register themselves.
        from pdserve.router.worker_pool import split_dns_target

        for name in ("prefill_targets", "decode_targets"):
            for target in getattr(self, name):
                try:
                    split_dns_target(target)
                except ValueError as e:  # a malformed dns: target
                    raise SettingError(name, str(e)) from None
        self.check_positive("prefill_timeout_s", "rpc_timeout_s", "worker_keepalive_s", "max_inflight",
                            "default_max_tokens", "load_poll_s")
