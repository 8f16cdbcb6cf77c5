"""Every pdserve metric, defined once, and the Prometheus endpoint that exports them.

Recorded where the event happens, or read at scrape time from what `watch_engine` / `watch_router` /
`watch_store` registered; `serve_prometheus()` (once per process) serves http://host:port/metrics.
Series and how each is measured: docs/observability.md ("Metrics").
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation

METER_NAME = "pdserve"
_meter = otel_metrics.get_meter(METER_NAME)

# Prometheus series name -> help text, for the dashboard check (tests/unit/test_deploy.py).
SERIES: dict[str, str] = {}
_SUFFIX = {"s": "_seconds", "By": "_bytes"}  # what the Prometheus exporter appends per unit


def _series(name: str, unit: str, counter: bool, description: str) -> None:
    suffix = _SUFFIX.get(unit, "")
    name = name.replace(".", "_")  # the exporter's spelling of OpenTelemetry's dotted names
    full = name if name.endswith(suffix) else name + suffix
    SERIES[full + ("_total" if counter else "")] = description


def _histogram(name: str, description: str, buckets: list[float]):
    _series(name, "s", False, description)
    return _meter.create_histogram(name, unit="s", description=description, explicit_bucket_boundaries_advisory=buckets)


def _counter(name: str, description: str, unit: str = "1"):
    _series(name, unit, True, description)
    return _meter.create_counter(name, unit=unit, description=description)


class _Watched:
    """An observable instrument's sources: (weakly held object, reader, attributes)."""

    def __init__(self) -> None:
        self._sources: list[tuple[weakref.ref, Callable[[Any], float], dict[str, str]]] = []
        self._lock = threading.Lock()  # callbacks run on the exporter's HTTP thread

    def add(self, obj: Any, read: Callable[[Any], float], attributes: dict[str, str]) -> None:
        """`attributes` is read at each scrape (its owner may change it: an elastic worker's role);
        nothing here may hold `obj` strongly, or a dropped engine would never be collected."""
        with self._lock:
            self._sources = [s for s in self._sources if s[0]() is not None]
            self._sources.append((weakref.ref(obj), read, attributes))

    def __call__(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._sources)
        for ref, read, attributes in sources:
            obj = ref()
            if obj is not None:
                yield Observation(read(obj), dict(attributes))  # as it is now


def _observed(kind: str, name: str, description: str, unit: str = "1") -> _Watched:
    watched = _Watched()
    _series(name, unit, kind == "counter", description)
    create = _meter.create_observable_counter if kind == "counter" else _meter.create_observable_gauge
    create(name, callbacks=[watched], unit=unit, description=description)
    return watched


# ---- the router: one request's latencies, outcome, SLOs (recorded) ------------------
# Named by the OpenTelemetry GenAI semantic conventions where one exists (so dashboards
# built for them work), with their attributes (pdserve.common.genai); pdserve_* for everything else.
_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5]
_E2E_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0]

TTFT = _histogram(
    "gen_ai.server.time_to_first_token", "Time from request arrival at the router to its first token", _LATENCY_BUCKETS
)
ITL = _histogram("pdserve_inter_token_latency", "Time between consecutive output tokens of a request", _TOKEN_BUCKETS)
TPOT = _histogram(
    "gen_ai.server.time_per_output_token",
    "Per request: (last token - first token) / (output tokens - 1)",
    _TOKEN_BUCKETS,
)
E2E = _histogram("gen_ai.server.request.duration", "Time from request arrival to its last token", _E2E_BUCKETS)
REQUESTS = _counter(
    "pdserve_requests",
    "Requests ended, by outcome: a finish reason (stop, length) "
    "or an error (a gRPC status name such as resource_exhausted, or cancelled)",
)
SLO = _counter(
    "pdserve_slo_requests",
    "Requests by objective (ttft, tpot) and whether they met it (attained=true|false), against the router's "
    "--slo-ttft-ms and --slo-tpot-ms: a failed request missed what it had not met; one refused for its own "
    "input is not scored, nor one cancelled before its result was known",
)
TOKENS = _counter(
    "pdserve_tokens",
    "Tokens by type: prompt and cached (of the prompt, found in a prefix cache) of finished requests, "
    "generation: every token streamed, to any request (tokens/s: its rate)",
)
ROUTED = _counter(
    "pdserve_routed_requests", "Finished requests by the worker that served each phase (role=prefill|decode, worker_id)"
)

# ---- the router's own state (observed) ----------------------------------------------
_ROUTER_INFLIGHT = _observed("gauge", "pdserve_router_inflight_requests", "Requests in flight at the router")
_PREFILL_DECISIONS = _observed(
    "counter",
    "pdserve_prefill_decisions",
    "Routing decisions by where the prompt is prefilled, one per attempt: a retry decides again "
    "(decision=disaggregated: a prefill worker; local_prefill: the decode worker)",
)
_RECOVERIES = _observed(
    "counter",
    "pdserve_router_recoveries",
    "Attempts that failed on a worker and were retried elsewhere, by the phase that failed "
    "(reserve, prefill, decode, generate); phase=gave_up: requests whose retry budget ran out",
)
RECOVERY_PHASES = ("reserve", "prefill", "decode", "generate", "gave_up")

# ---- a worker's engine (observed) ---------------------------------------------------
_WAITING = _observed("gauge", "pdserve_queue_depth", "Sequences waiting to be scheduled")
_RUNNING = _observed("gauge", "pdserve_running_sequences", "Sequences in the running batch")
_BLOCKS_USED = _observed("gauge", "pdserve_kv_blocks_used", "KV cache blocks in use (role=kvstore: the store's slots)")
_BLOCKS_TOTAL = _observed(
    "gauge", "pdserve_kv_blocks_capacity", "KV cache blocks in all (role=kvstore: the store's slots)"
)
_PREFIX_QUERIED = _observed(
    "counter", "pdserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache"
)
_PREFIX_HIT = _observed("counter", "pdserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache")
_PREEMPTIONS = _observed("counter", "pdserve_preemptions", "Sequences preempted for lack of KV blocks")
_QUARANTINED = _observed(
    "gauge",
    "pdserve_kv_blocks_quarantined",
    "KV blocks a transfer that could not be fenced might still write: out of use until its receives complete",
)

# ---- the KV store (observed) --------------------------------------------------------
_STORE_LOOKUPS = _observed(
    "counter", "pdserve_kvstore_lookup_blocks", "Blocks asked of the KV store, by result (hit, miss)"
)

# ---- KV transfers (recorded by the transfer layer, for every sender and receiver)
PAIRS_SKIPPED = _counter(
    "pdserve_router_pairs_skipped",
    "Prefill workers a request's decode worker could not be "
    "paired with, by reason: kv_layout (model, dtype, block size) or kv_wire_version",
)
ROLE_SWITCHES = _counter(
    "pdserve_router_role_switches",
    "Elastic workers moved to another role, by from, to and "
    "reason (operator: SetWorkerRole; balancer: the live arrival mix)",
)
TRANSFER_BYTES = _counter(
    "pdserve_kv_transfer_bytes", "KV bytes sent and taken by their receiver, by transport", unit="By"
)
TRANSFER_SECONDS = _histogram(
    "pdserve_kv_transfer_duration",
    "One send (a prefill chunk's blocks, or a KV store push) until the receiver has the bytes",
    # to the send timeout (30 s)
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0],
)
TRANSFER_FAILURES = _counter(
    "pdserve_kv_transfer_failures",
    "KV transfers that failed, by transport, side "
    "(send, receive) and reason (failed: a transport error or bad data; timeout)",
)


def watch_engine(engine: Any, labels: dict[str, str]) -> None:
    """Export an engine's queue, batch, KV pool and prefix cache (its stats(), read at scrape time),
    under `labels` (worker_id and role) as they are then: an elastic worker changes its role there."""
    for watched, read in (
        (_WAITING, lambda e: e.stats().waiting),
        (_RUNNING, lambda e: e.stats().running),
        (_BLOCKS_USED, lambda e: (s := e.stats()).total_blocks - s.free_blocks),
        (_BLOCKS_TOTAL, lambda e: e.stats().total_blocks),
        (_PREFIX_QUERIED, lambda e: e.stats().prefix_queries),
        (_PREFIX_HIT, lambda e: e.stats().prefix_hits),
        (_PREEMPTIONS, lambda e: e.stats().preemptions),
        (_QUARANTINED, lambda e: e.stats().quarantined_blocks),
    ):
        watched.add(engine, read, labels)


def watch_router(router: Any) -> None:
    """Export a Router's in-flight count, prefill decisions (`Router.decisions`) and
    recoveries (`Router.recoveries`)."""
    _ROUTER_INFLIGHT.add(router, lambda r: r.inflight, {})
    for decision in ("disaggregated", "local_prefill"):
        _PREFILL_DECISIONS.add(router, lambda r, d=decision: r.decisions[d], {"decision": decision})
    for phase in RECOVERY_PHASES:
        _RECOVERIES.add(router, lambda r, p=phase: r.recoveries[p], {"phase": phase})


def watch_store(store: Any) -> None:
    """Export a KV BlockStore's occupancy, quarantined slots and lookups."""
    attributes = {"role": "kvstore", "worker_id": "kvstore"}
    _BLOCKS_USED.add(store, lambda s: s.used, attributes)
    _BLOCKS_TOTAL.add(store, lambda s: s.capacity, attributes)
    _QUARANTINED.add(store, lambda s: s.stats.quarantined, attributes)
    _STORE_LOOKUPS.add(store, lambda s: s.stats.hit_blocks, {"result": "hit"})
    _STORE_LOOKUPS.add(store, lambda s: s.stats.miss_blocks, {"result": "miss"})


_served: int | None = None


def serve_prometheus(host: str, port: int, *, service: str, instance: str = "") -> int | None:
    """Install the SDK's meter provider and serve /metrics on host:port (0: any
    free port); returns the bound port, or None when port is -1 (metrics off).
    Once per process: the meter provider is process-wide."""
    global _served
    if port < 0:
        return None
    if _served is not None:
        raise RuntimeError(f"metrics are already served on port {_served}")
    import prometheus_client
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource

    # A taken port raises here (OSError), before the service reports SERVING.
    server, _ = prometheus_client.start_http_server(port, addr=host)
    attributes = {SERVICE_NAME: f"pdserve-{service}", **({SERVICE_INSTANCE_ID: instance} if instance else {})}
    otel_metrics.set_meter_provider(
        MeterProvider(resource=Resource.create(attributes), metric_readers=[PrometheusMetricReader()])
    )
    _served = server.server_port
    return _served
