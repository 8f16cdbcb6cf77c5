"""Router configuration."""

from __future__ import annotations

import re
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
    allowed_origins: list[str] = option(
        default_factory=list,
        help="web origins (scheme://host[:port], or *) whose pages may call the HTTP API from a browser "
        "(CORS); none by default",
    )
    mode: Literal["disaggregated", "colocated"] = option("disaggregated")
    prefill_targets: list[str] = option(
        default_factory=list,
        help="prefill workers: host:port, or dns:NAME:PORT for "
        "every address NAME resolves to, looked up at each load poll (or let them "
        "register)",
    )
    decode_targets: list[str] = option(default_factory=list, help="decode (or colocated) workers, as --prefill-targets")
    model: str = option("", help="the workers' model, for the tokenizer (default: bundled SmolLM2)")
    local_prefill: Literal["auto", "always", "never"] = option(
        "auto", help="disaggregated mode: let the decode worker prefill when the cost model says it is faster"
    )
    max_inflight: int = option(256, help="requests in flight at most; more get RESOURCE_EXHAUSTED")
    default_max_tokens: int = option(256, help="max_tokens when a request leaves it unset")
    load_poll_s: float = option(0.5, help="how often worker loads are refreshed (and registered workers heartbeat)")
    worker_lease_s: float = option(5.0, help="a registered worker silent this long leaves the registry")
    rpc_timeout_s: float = option(
        600.0,
        help="deadline of each downstream unary call (cut to the client's own deadline); a token "
        "stream runs as long as the client's deadline allows (a hung worker is found by worker_keepalive_s)",
    )
    prefill_timeout_s: float = option(120.0, help="a Prefill call slower than this fails over to another worker")
    worker_keepalive_s: float = option(
        10.0,
        help="ping a worker this often while calls to it are open; one silent as long again fails "
        "them over (a hung process or a cut link sends no reset)",
    )
    max_retries: int = option(2, help="failed attempts a request may retry (on other workers) before it errors")
    grace_s: float = option(10.0, help="on SIGTERM, seconds in-flight requests get to finish")
    metrics_port: int = option(9464, help="Prometheus /metrics port, on --host (0: any free port, -1: no metrics)")
    slo_ttft_ms: float = option(1000.0, help="time-to-first-token objective counted in pdserve_slo_requests (0: none)")
    slo_tpot_ms: float = option(100.0, help="time-per-output-token objective counted in pdserve_slo_requests (0: none)")
    log_format: LogFormat = option("text", help="log lines as text or json (one object per line)")
    balance_profile: str = option(
        "",
        help="a profile from `pdserve profile`: move elastic workers between prefill "
        "and decode to fit the live arrival mix, by simulating each split against "
        "--slo-ttft-ms and --slo-tpot-ms (empty: only SetWorkerRole moves them)",
    )
    balance_threads: int = option(0, help="torch threads of each elastic worker, to read the profile (0: its fewest)")
    balance_interval_s: float = option(15.0, help="how often the balancer evaluates the splits")
    balance_window_s: float = option(120.0, help="the balancer replays the arrivals of this many last seconds")
    balance_margin: float = option(0.1, help="share of requests within objectives a split must add to be moved to")
    balance_confirm: int = option(3, help="evaluations in a row a better split must win before a switch")
    balance_dwell_s: float = option(60.0, help="seconds after a switch before the next")

    def validate(self) -> None:
        self.check_listen_ports(also_taken=[self.http_port])
        # The HTTP server may share the gRPC port number only on another address.
        self.check_port("http_port", off=True, taken=[self.port] if self.http_host in ("", self.host) else [])
        for name in ("slo_ttft_ms", "slo_tpot_ms", "max_retries"):
            if getattr(self, name) < 0:
                raise SettingError(name, "must be >= 0")
        for origin in self.allowed_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s*]+/?", origin):
                raise SettingError("allowed_origins", f"{origin!r} is not * or scheme://host[:port] (no wildcards)")
        # Empty target lists are fine: workers started with --router register themselves.
        from pdserve.router.worker_pool import split_dns_target

        for name in ("prefill_targets", "decode_targets"):
            for target in getattr(self, name):
                try:
                    split_dns_target(target)
                except ValueError as e:  # a malformed dns: target
                    raise SettingError(name, str(e)) from None
        self.check_positive(
            "prefill_timeout_s",
            "rpc_timeout_s",
            "worker_keepalive_s",
            "max_inflight",
            "default_max_tokens",
            "load_poll_s",
            "balance_interval_s",
            "balance_window_s",
            "balance_confirm",
        )
        if self.balance_threads < 0 or self.balance_dwell_s < 0 or not 0 <= self.balance_margin <= 1:
            raise SettingError(
                "balance_margin"
                if self.balance_threads >= 0 <= self.balance_dwell_s
                else "balance_threads"
                if self.balance_threads < 0
                else "balance_dwell_s",
                "balance_margin is a share (0..1); balance_threads and balance_dwell_s are >= 0",
            )

    def balancer(self):
        """The role balancer's settings and profile, or None without --balance-profile."""
        if not self.balance_profile:
            return None
        from pdserve.planner.planner import Objectives
        from pdserve.planner.profile import Profile
        from pdserve.router.role_balancer import BalancerConfig

        try:
            profile = Profile.load(self.balance_profile)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise SettingError("balance_profile", f"not a profile from `pdserve profile`: {e}") from None
        objectives = Objectives(self.slo_ttft_ms or Objectives.ttft_ms, self.slo_tpot_ms or Objectives.tpot_ms)
        config = BalancerConfig(
            self.balance_interval_s,
            self.balance_window_s,
            self.balance_margin,
            self.balance_confirm,
            self.balance_dwell_s,
        )
        return profile, objectives, config
