"""`pdserve bench tracing`: end-to-end latency with tracing off vs on.

Two suites of real processes, one with OTEL_SDK_DISABLED=true, one exporting every trace over OTLP/HTTP to a
sink in this process, take the same requests in turn. Goal (issue #5): tracing adds under 5% to the median.
How it is fair to both: docs/observability.md ("Configuration", at its end).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import io
import json
import os
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pdserve.client import AsyncClient
from pdserve.launcher import Suite

WARM_UP = 2  # requests per arm not counted: first calls, first transfers


class OtlpSink:
    """An OTLP/HTTP trace receiver that counts spans by service.name."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: collections.Counter[str] = collections.Counter()
        self.trace_ids: set[bytes] = set()
        lock, sink = threading.Lock(), self
        ok = ExportTraceServiceResponse().SerializeToString()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    for rs in request.resource_spans:
                        name = next(
                            (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "?"
                        )
                        for ss in rs.scope_spans:
                            sink.spans[name] += len(ss.spans)
                            sink.trace_ids.update(s.trace_id for s in ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(ok)))
                self.end_headers()
                self.wfile.write(ok)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


def _prompt(n: int, salt: int) -> list[int]:
    return [100 + (salt * 7919 + i * 31) % 30000 for i in range(n)]


async def _one(client: AsyncClient, prompt: list[int], max_tokens: int) -> float:
    t = time.perf_counter()
    await client.complete(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return (time.perf_counter() - t) * 1e3


async def _interleaved(targets: dict[str, str], args) -> dict[str, list[float]]:
    clients = {arm: AsyncClient(target, timeout=300) for arm, target in targets.items()}
    e2e: dict[str, list[float]] = {arm: [] for arm in targets}
    try:
        for i in range(WARM_UP + args.requests):
            prompt = _prompt(args.prompt_tokens, i)
            order = list(targets) if i % 2 == 0 else list(reversed(targets))
            for arm in order:
                ms = await _one(clients[arm], prompt, args.max_tokens)
                if i >= WARM_UP:
                    e2e[arm].append(ms)
    finally:
        for c in clients.values():
            await c.close()
    return e2e


def main(args) -> int:
    # The arms' tracing settings are the ones below, not whatever this shell has.
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]
    sink = OtlpSink()
    common = {"PDSERVE_LOCAL_PREFILL": "never", "PDSERVE_HTTP_PORT": "0"}
    arms = {
        "off": {**common, "OTEL_SDK_DISABLED": "true"},
        "on": {**common, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url},
    }  # default sampler, exporter, protocol
    logs = {arm: io.StringIO() for arm in arms}
    try:
        with (
            Suite(port=args.port, base_port=args.port + 10, kv_cache_gib=0.5, out=logs["off"], env=arms["off"]) as off,
            Suite(
                port=args.port + 100, base_port=args.port + 110, kv_cache_gib=0.5, out=logs["on"], env=arms["on"]
            ) as on,
        ):
            e2e = asyncio.run(_interleaved({"off": off.router_target, "on": on.router_target}, args))
        # Stopped: every service flushed its queued spans on the way out.
    except Exception:
        for arm, log in logs.items():
            print(f"--- the tracing-{arm} suite's last output:\n" + "\n".join(log.getvalue().splitlines()[-30:]))
        raise
    finally:
        sink.close()
    medians = {arm: statistics.median(v) for arm, v in e2e.items()}
    ratio = medians["on"] / medians["off"]
    results = {
        "requests_per_arm": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "e2e_ms_median": medians,
        "e2e_ms_all": e2e,
        "ratio": ratio,
        "spans_exported_by_service": dict(sink.spans),
        "traces_exported": len(sink.trace_ids),
    }
    for arm in ("off", "on"):
        print(
            f"tracing {arm:>3}: end-to-end median {medians[arm]:.1f} ms over {args.requests} requests "
            f"({args.prompt_tokens} prompt tokens, {args.max_tokens} generated)"
        )
    spans = sum(sink.spans.values())
    print(
        f"exported: {spans} spans in {len(sink.trace_ids)} traces "
        f"({', '.join(f'{k} {v}' for k, v in sorted(sink.spans.items()))})"
    )
    print(f"on / off = {ratio:.3f}: tracing adds {(ratio - 1) * 100:+.1f}% (goal < 5%)")
    if len(sink.trace_ids) < WARM_UP + args.requests:
        print("warning: fewer traces exported than requests sent; was tracing on?")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=30, help="measured requests per arm (after 2 warm-up ones)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32, help="generated per request (ignore_eos)")
    p.add_argument("--port", type=int, default=56051, help="the tracing-off suite's router; the other's is +100")
    p.add_argument("--json", default=None)
