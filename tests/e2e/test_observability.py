"""Observability of a running suite (real processes): Prometheus scrapes every
service, grpc.health.v1 and server reflection answer on every service, and the
router writes one JSON log line per request.

The Prometheus server is the real one (Debian's `prometheus` package, which
`make install-test` installs): started here with a generated configuration that
scrapes each service's metrics port every second.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pdserve.client import AsyncClient
from pdserve.launcher import Suite
from pdserve.v1 import decode_pb2, kvstore_pb2, prefill_pb2, router_pb2
from tests.e2e.conftest import free_port_run
from tests.polling import eventually

_SCRAPED_S = 60.0  # what a sample may take to reach a query (scrapes run every second)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "observability" / "grafana-dashboard.json"
SERVICES = {  # suite service -> the gRPC service it serves
    "router": router_pb2.DESCRIPTOR.services_by_name["Router"],
    "prefill-0": prefill_pb2.DESCRIPTOR.services_by_name["Prefill"],
    "decode-0": decode_pb2.DESCRIPTOR.services_by_name["Decode"],
    "kvstore": kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"],
}
LONG = (
    "You are a careful assistant. Answer in one short sentence, plainly, without lists, and do not "
    "repeat the question. Here is the question about geography and history: what is the capital of France?"
)
PROMPTS = [LONG, "Write one word about the sea.", "Count: one, two,", LONG]  # the repeat hits the prefix cache
SECRET_PROMPT = "zebra-umbrella-7931 is the secret"  # must never reach a log


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        why = "the prometheus server is not installed (Debian: apt-get install prometheus; `make install-test` does)"
        if os.environ.get("CI") or os.geteuid() == 0:
            pytest.fail(why)  # CI, and root, install it through make install-test
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    base = free_port_run(8)  # router, prefill, decode, kvstore; then their metrics ports
    s = Suite(
        mode="disaggregated",
        port=base,
        base_port=base + 1,
        metrics_port=base + 4,
        kv_cache_gib=0.25,
        log_level="INFO",
        log_dir=tmp_path_factory.mktemp("logs-observability"),
        ready_timeout=600,
        env={"PDSERVE_HTTP_PORT": "0", "PDSERVE_LOCAL_PREFILL": "never", "PDSERVE_LOG_FORMAT": "json"},
    )
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def traffic(suite):
    """A few requests over gRPC and one over the OpenAI HTTP API; returns their request ids."""

    async def send() -> list[str]:
        ids = []
        async with AsyncClient(suite.router_target, timeout=120) as client:
            for i, prompt in enumerate([*PROMPTS, SECRET_PROMPT]):
                c = await client.complete(prompt, max_tokens=8, temperature=0.0, ignore_eos=True, request_id=f"obs-{i}")
                assert len(c.token_ids) == 8
                ids.append(c.request_id)
        return ids

    ids = asyncio.run(send())
    url = next(
        re.search(r"API on (http://\S+)", line).group(1)
        for line in router_log(suite)
        if "OpenAI-compatible API on" in line
    )
    body = json.dumps({"prompt": "Hello", "max_tokens": 4}).encode()
    with urllib.request.urlopen(
        urllib.request.Request(f"{url}/completions", body, {"Content-Type": "application/json"}), timeout=120
    ) as r:
        assert json.load(r)["choices"][0]["text"] is not None
    return ids


def router_log(suite) -> list[str]:
    return (suite.log_dir / "router.log").read_text().splitlines()


@pytest.fixture(scope="module")
def prometheus(suite, tmp_path_factory):
    """A Prometheus server scraping every service of the suite each second; yields its API URL."""
    binary = prometheus_binary()
    work = tmp_path_factory.mktemp("prometheus")
    targets = [{"targets": [s.metrics], "labels": {"service": s.name}} for s in suite.services if s.address]
    assert len(targets) == 4 and all(t["targets"][0] for t in targets)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "pdserve", "static_configs": targets}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        # Ready is not scraped: wait for a first scrape of every target, so that samples
        # from before the traffic exist (a test that sends traffic asks for this fixture first).
        health = eventually(lambda: (h := targets_health(url)) and all(v == "up" for v in h.values()) and h, _SCRAPED_S)
        assert health == dict.fromkeys(["prefill-0", "decode-0", "kvstore", "router"], "up"), targets_health(url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def api(url: str, path: str, **params: str) -> object:
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def query(url: str, expr: str) -> list[dict]:
    return api(url, "query", query=expr)["result"]


def targets_health(url: str) -> dict[str, str]:
    return {t["labels"]["service"]: t["health"] for t in api(url, "targets")["activeTargets"]}


def by_service(results: list[dict]) -> dict[str, float]:
    return {r["metric"].get("service", ""): float(r["value"][1]) for r in results}


def test_prometheus_scrapes_every_service_and_sees_ttft_and_itl(suite, prometheus, traffic):
    # `prometheus` before `traffic`: every service was scraped before the requests.
    assert set(targets_health(prometheus).values()) == {"up"}
    requests = len(traffic) + 1  # the HTTP one too
    ttft = eventually(
        lambda: [
            r
            for r in query(prometheus, "gen_ai_server_time_to_first_token_seconds_count")
            if float(r["value"][1]) >= requests
        ],
        _SCRAPED_S,
    )
    assert ttft and ttft[0]["metric"]["service"] == "router"
    itl = query(prometheus, "sum(pdserve_inter_token_latency_seconds_count)")
    assert itl and float(itl[0]["value"][1]) >= requests * 3  # 8 tokens: 7 gaps each (4 over HTTP)
    # The quantile from the buckets' totals: a rate() over them depends on how the scrapes fell
    # against the requests (NaN when one scrape saw them all); the dashboard test evaluates rates.
    p99 = query(prometheus, "histogram_quantile(0.99, sum by (le) (gen_ai_server_time_to_first_token_seconds_bucket))")
    assert p99 and 0 < float(p99[0]["value"][1]) < 120, (
        query(prometheus, "up[1m]"),
        query(prometheus, "gen_ai_server_time_to_first_token_seconds_bucket"),
    )

    # A request's outcome is counted when its stream closes, which can be a scrape after its first token.
    def counted():
        return {r["metric"]["outcome"]: float(r["value"][1]) for r in query(prometheus, "pdserve_requests_total")}

    outcomes = eventually(lambda: (o := counted()) and sum(o.values()) >= requests and o, _SCRAPED_S) or counted()
    assert outcomes["length"] >= len(traffic) and sum(outcomes.values()) == requests  # the HTTP one may stop
    assert set(outcomes) <= {"length", "stop"}
    # Every service reports its own state.
    assert set(by_service(query(prometheus, "pdserve_kv_blocks_capacity"))) == {"prefill-0", "decode-0", "kvstore"}

    # Each target is scraped on its own clock: the router's last scrape says nothing of prefill-0's.
    def prefill_hits() -> float:
        hits = by_service(query(prometheus, "sum by (service) (pdserve_prefix_cache_hit_tokens_total)"))
        return hits.get("prefill-0", 0.0)

    assert eventually(lambda: prefill_hits() > 0, _SCRAPED_S), prefill_hits()
    sent = by_service(query(prometheus, 'sum by (service) (pdserve_kv_transfer_bytes_total{transport="ucx"})'))
    assert sent.get("prefill-0", 0) > 0  # prefill pushed KV to the decode worker over UCX
    decisions = {
        r["metric"]["decision"]: float(r["value"][1]) for r in query(prometheus, "pdserve_prefill_decisions_total")
    }
    assert decisions["disaggregated"] >= requests and decisions.get("local_prefill", 0) == 0


def test_every_dashboard_query_evaluates_on_the_live_suite(suite, prometheus, traffic):
    dashboard = json.loads(DASHBOARD.read_text())
    # Only failures, preemptions, store lookups, skipped pairs (a fleet of two versions) and
    # role switches (elastic workers) may have nothing to show on a healthy suite.
    may_be_empty = {
        "KV transfer failures",
        "Preemptions",
        "KV store lookups",
        "Router pairs skipped",
        "Elastic role switches",
    }

    empty: set[str] = set()

    def only_those_empty() -> bool:
        empty.clear()
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "5m").replace("$__range", "1h")
                if not query(prometheus, expr):  # a query Prometheus rejects raises in api()
                    empty.add(panel["title"])
        return empty <= may_be_empty

    assert eventually(only_those_empty, _SCRAPED_S), (sorted(empty), query(prometheus, "up[1m]"))


def test_health_and_reflection_clients_see_every_service_serving_with_its_methods(suite):
    addresses = {s.name: s.address for s in suite.services if s.address}
    assert set(addresses) == set(SERVICES)
    for name, service in SERVICES.items():
        with grpc.insecure_channel(addresses[name]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for checked in ("", service.full_name):
                status = health.Check(health_pb2.HealthCheckRequest(service=checked), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING, (name, checked)
            database = ProtoReflectionDescriptorDatabase(channel)
            listed = set(database.get_services())
            assert listed == {service.full_name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}, (
                name,
                listed,
            )
            found = DescriptorPool(database).FindServiceByName(service.full_name)
            assert {m.name for m in found.methods} == {m.name for m in service.methods}, name
            assert len(found.methods) >= 2


def test_router_logs_one_json_line_per_request_with_its_id_and_never_the_prompt(suite, traffic):
    lines = router_log(suite)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all(r["service"] == "router" for r in records)
    finished = {r["request_id"]: r for r in records if r["message"].startswith("request finished")}
    for request_id in traffic:
        r = finished[request_id]
        assert r["outcome"] == "length" and r["output_tokens"] == 8 and r["ttft_ms"] > 0
        assert r["decode_worker"] == "decode-0" and r["prefill_worker"] == "prefill-0"
    for path in suite.log_dir.glob("*.log"):
        assert SECRET_PROMPT not in path.read_text(), f"{path.name} logs a prompt"
