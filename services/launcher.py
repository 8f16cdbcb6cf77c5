"""`pdserve up`: the whole suite on this machine, one OS process per service.

Stages: prepare the model once (workers would race to convert it), then the
workers, then the router, each stage once the previous one reports SERVING on
grpc.health.v1. Output is relayed as `[name] line`. Ctrl-C / SIGTERM / SIGHUP
stop the stages in reverse (the router first: no new request reaches a worker
that is going away): SIGTERM, a grace period, SIGKILL. A service that exits on
its own brings the suite down with exit code 1. In tests and benchmarks:
`with Suite(mode="colocated", decode=2) as suite: Client(suite.router_target)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.common import security

MODES = ("disaggregated", "colocated")
_COLORS = ("36", "33", "35", "32", "34", "91", "96", "93")
_SERVING = health_pb2.HealthCheckResponse.SERVING


class SuiteError(RuntimeError):
    """The suite could not start or lost a service."""


@dataclass(frozen=True)
class Service:
    """One child process. `address` (host:port) answers grpc.health.v1; None
    marks a one-shot step, ready when it exits 0. Stages start in order.
    `metrics` (host:port) serves Prometheus /metrics, when known."""
    name: str
    argv: tuple[str, ...]
    address: str | None
    stage: int
    metrics: str | None = None


def _dial(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard is not dialable


def plan(mode: str = "disaggregated", prefill: int = 1, decode: int = 1, *, model: str | None = None,
         host: str = "127.0.0.1", port: int = 50051, base_port: int = 50061, kv_cache_gib: float | None = None,
         kvstore: bool = True, log_level: str | None = None, http_port: int | None = None,
         metrics_port: int = -1, threads: int | None = None, python: str = sys.executable,
         hosts: Mapping[str, str] | None = None, device: str | None = None) -> list[Service]:
    """The services of a suite, with their command lines; validates the shape.

    hosts: a service's own --host by name (e.g. "prefill-0": one address per
    machine or network namespace); the others use `host`.

    metrics_port: the router's Prometheus port; the other services take the next
    ports, in the order listed. -1 (the default here): no metrics; 0: any free ports.

    device: the model workers' torch device; a comma-separated list is dealt out in
    turn (prefill workers first), e.g. "cuda:0,cuda:1" for one GPU each of two workers.

    threads: torch threads per model worker; None: this machine's cores shared
    among them (two workers with a thread per core each measured 4x slower to
    start here on 2 cores: their OpenMP pools spin against each other); 0: torch's default."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    prefill = prefill if mode == "disaggregated" else 0  # colocated workers prefill themselves
    if decode < 1:
        raise ValueError("at least one decode worker is needed (--decode)")
    if mode == "disaggregated" and prefill < 1:
        raise ValueError("disaggregated mode needs a prefill worker (--prefill), or use --mode colocated")
    if base_port <= port < base_port + prefill + decode + kvstore:
        raise ValueError(f"--port {port} collides with the worker ports from --base-port {base_port}")
    serve = (python, "-m", "pdserve", *(("--log-level", log_level) if log_level else ()), "serve")
    common = ("--model", model) if model else ()
    per_worker = ("--kv-cache-gib", str(kv_cache_gib)) if kv_cache_gib is not None else ()
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // (prefill + decode))
    per_worker += ("--threads", str(threads))
    services = [Service("model", (python, "-c", "import sys; from pdserve.common import model_loader; "
                                  "print('model ready:', model_loader.resolve(sys.argv[1] or None).path)",
                                  model or ""), None, 0)]
    kvstore = kvstore and prefill > 0  # the store serves the disaggregated workers
    ports = iter(range(base_port, base_port + prefill + decode + 1))
    targets: dict[str, list[str]] = {"prefill": [], "decode": []}
    store_port = base_port + prefill + decode
    def at(name: str) -> str:
        return (hosts or {}).get(name, host)
    store = ("--kvstore", f"{_dial(at('kvstore'))}:{store_port}") if kvstore else ()
    devices = itertools.cycle(device.split(",") if device else [None])
    for role, count in (("prefill", prefill), ("decode", decode)):
        for i in range(count):
            p, name, dev = next(ports), f"{role}-{i}", next(devices)
            extra = ("--role", "colocated") if mode == "colocated" else store
            extra += ("--device", dev) if dev else ()
            services.append(Service(name, (*serve, role, "--host", at(name), "--port", str(p), "--worker-id", name,
                                           *common, *per_worker, *extra), f"{_dial(at(name))}:{p}", 1))
            targets[role].append(f"{_dial(at(name))}:{p}")
    if kvstore:
        services.append(Service("kvstore", (*serve, "kvstore", "--host", at("kvstore"), "--port", str(store_port),
                                            *common), f"{_dial(at('kvstore'))}:{store_port}", 1))
    # List flags take one value per target (the config parser's nargs="*").
    pre = ("--prefill-targets", *targets["prefill"]) if prefill else ()
    http = ("--http-port", str(http_port)) if http_port is not None else ()
    services.append(Service("router", (*serve, "router", "--host", at("router"), "--port", str(port), "--mode", mode,
                                       *pre, "--decode-targets", *targets["decode"], *common, *http),
                            f"{_dial(at('router'))}:{port}", 2))
    return _with_metrics(services, metrics_port, taken={port, http_port, *range(base_port, store_port + 1)})


def _with_metrics(services: list[Service], first: int, taken: set[int | None]) -> list[Service]:
    """Give every service a --metrics-port: the router `first`, the others the next ports."""
    servers = sorted((s for s in services if s.address), key=lambda s: s.name != "router")
    ports = {s.name: first + i if first > 0 else first for i, s in enumerate(servers)}
    if first > 0 and not taken.isdisjoint(ports.values()):
        raise ValueError(f"--metrics-port {first}: ports {first}..{first + len(servers) - 1} collide with "
                         "the gRPC or HTTP ports")
    def placed(s: Service) -> Service:  # beside --port
        at = s.argv.index("--port")
        argv = (*s.argv[:at], "--metrics-port", str(ports[s.name]), *s.argv[at:])
        host = s.argv[s.argv.index("--host") + 1]
        return dataclasses.replace(s, argv=argv, metrics=f"{_dial(host)}:{ports[s.name]}" if first > 0 else None)
    return [placed(s) if s.address else s for s in services]


class Suite:
    """Starts services stage by stage, relays their logs, and stops them.
    Keyword arguments go to `plan()`, or pass `services=` directly."""

    def __init__(self, mode: str = "disaggregated", prefill: int = 1, decode: int = 1, *,
                 services: list[Service] | None = None, log_dir: str | Path | None = None,
                 ready_timeout: float = 300.0, grace_s: float = 15.0, out: TextIO | None = None,
                 env: dict[str, str] | None = None, **plan_kwargs) -> None:
        self.services = services if services is not None else plan(mode, prefill, decode, **plan_kwargs)
        self.log_dir = Path(log_dir) if log_dir else None
        self.ready_timeout, self.grace_s = ready_timeout, grace_s
        self.out = out or sys.stdout
        color = self.out.isatty() and "NO_COLOR" not in os.environ
        self._prefix = {s.name: (f"\x1b[{_COLORS[i % len(_COLORS)]}m[{s.name}]\x1b[0m " if color else f"[{s.name}] ")
                        for i, s in enumerate(self.services)}
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}  # children log line by line
        try:  # the children's own PDSERVE_TLS_* settings: health polls must speak their TLS
            self._tls = security.from_environment(self._env).client_tls()
        except ValueError as e:
            raise SuiteError(f"TLS settings: {e}") from None
        self._procs: dict[str, subprocess.Popen] = {}
        self._pumps: list[threading.Thread] = []
        self._lock = threading.RLock()  # re-entrant: say() also runs in signal handlers

    @property
    def router_target(self) -> str:
        return next(s.address for s in self.services if s.name == "router")

    def say(self, message: str) -> None:
        with self._lock:
            print(f"pdserve up: {message}", file=self.out, flush=True)

    def _pump(self, name: str, stream) -> None:
        log_file = open(self.log_dir / f"{name}.log", "a", encoding="utf-8") if self.log_dir else None
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self._lock:
                    try:
                        print(self._prefix[name] + line, file=self.out, flush=True)
                    except (OSError, ValueError):
                        pass  # our stdout is gone (e.g. piped to head): keep draining, or the child blocks
                if log_file:
                    log_file.write(line + "\n")
                    log_file.flush()
        finally:
            stream.close()
            if log_file:
                log_file.close()

    def _spawn(self, service: Service) -> None:
        # Own process group: a terminal's Ctrl-C reaches only us, and we stop
        # the children in order instead of all at once.
        proc = subprocess.Popen(service.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self._env, process_group=0)
        self._procs[service.name] = proc
        pump = threading.Thread(target=self._pump, args=(service.name, proc.stdout), daemon=True)
        pump.start()
        self._pumps.append(pump)

    def _wait_ready(self, stage: list[Service], deadline: float, stop: threading.Event) -> None:
        pending = {s.name: s for s in stage}
        # Short reconnect backoff: by default gRPC waits up to minutes between
        # attempts at a port nobody listens on yet (a worker loading its model).
        fast = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500)]
        channels = {s.name: security.dial(s.address, self._tls, options=fast, sync=True) for s in stage if s.address}
        try:
            while pending:
                for name, service in list(pending.items()):
                    code = self._procs[name].poll()
                    if service.address is None and code == 0:
                        del pending[name]
                    elif code is not None:
                        raise SuiteError(f"{name} exited with code {code} before it was ready (its log is above)")
                    elif service.address and self._serving(channels[name]):
                        self.say(f"{name} is serving at {service.address}")
                        del pending[name]
                if pending and time.monotonic() > deadline:
                    raise SuiteError(f"not ready after {self.ready_timeout:g}s: {', '.join(pending)}")
                if pending and stop.wait(0.2):
                    raise SuiteError("interrupted while starting")
        finally:
            for channel in channels.values():
                channel.close()

    @staticmethod
    def _serving(channel: grpc.Channel) -> bool:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check
            return check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status == _SERVING
        except grpc.RpcError:  # not listening yet, or no health service yet
            return False

    def start(self, stop: threading.Event | None = None) -> None:
        """Start every stage and wait for it; raises SuiteError (after stopping
        what started) when a service dies, times out, or `stop` is set."""
        stop = stop or threading.Event()
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.ready_timeout
        try:
            for stage in sorted({s.stage for s in self.services}):
                members = [s for s in self.services if s.stage == stage]
                for service in members:
                    self._spawn(service)
                self._wait_ready(members, deadline, stop)
        except BaseException:
            self.stop()
            raise

    def wait(self, stop: threading.Event) -> int:
        """Supervise until `stop` is set (0) or a service exits on its own (1)."""
        while not stop.wait(0.2):
            for service in self.services:
                code = self._procs[service.name].poll() if service.address else None
                if code is not None:
                    self.say(f"{service.name} exited unexpectedly with code {code}; stopping the suite")
                    return 1
        return 0

    def stop(self) -> None:
        """SIGTERM running children, last stage first; SIGKILL after the grace period."""
        for stage in sorted({s.stage for s in self.services}, reverse=True):
            procs = {s.name: self._procs[s.name] for s in self.services
                     if s.stage == stage and s.name in self._procs and self._procs[s.name].poll() is None}
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for name, proc in procs.items():
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"{name} did not stop within {self.grace_s:g}s; killing it")
                    proc.kill()
                    proc.wait()
        for pump in self._pumps:
            pump.join(timeout=5)  # the last lines of every log

    def signal(self, name: str, signum: int) -> subprocess.Popen:
        """Send one service a signal (SIGTERM drains it, SIGKILL is a crash); its process."""
        proc = self._procs[name]
        proc.send_signal(signum)
        return proc

    def kill(self) -> None:  # a second Ctrl-C
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()

    def __enter__(self) -> Suite:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def supervise(suite: Suite) -> int:
    """Run a suite until Ctrl-C / SIGTERM / SIGHUP (exit 0) or a failure (exit 1).
    Must run in the main thread (it installs signal handlers)."""
    stop = threading.Event()
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            suite.say("second signal: killing every service now")
            suite.kill()
        stop.set()
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        try:
            suite.start(stop)
        except SuiteError as e:
            if stop.is_set():
                suite.say("stopped before the suite was ready")
                return 0
            suite.say(f"failed to start: {e}")
            return 1
        rows = "\n".join(f"  {s.name:<10} {s.address}" + (f"  metrics http://{s.metrics}/metrics" if s.metrics else "")
                         for s in suite.services if s.address)
        suite.say(f"ready; clients connect to {suite.router_target}\n{rows}")
        code = suite.wait(stop)
        suite.say("stopping" if code == 0 else "stopping after a failure")
        suite.stop()
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_up_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="disaggregated")
    parser.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill workers (disaggregated mode)")
    parser.add_argument("--decode", type=int, default=1, metavar="M", help="decode (or colocated) workers")
    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: bundled SmolLM2)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="the router's gRPC port")
    parser.add_argument("--http-port", type=int, default=None,
                        help="the router's OpenAI-compatible HTTP port (default 8000 or PDSERVE_HTTP_PORT; -1: none)")
    parser.add_argument("--base-port", type=int, default=50061, help="workers take consecutive ports from here")
    parser.add_argument("--metrics-port", type=int, default=9464,
                        help="the router's Prometheus /metrics port; workers and the store take the next ports "
                             "(-1: no metrics, 0: any free ports)")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache per worker")
    parser.add_argument("--device", default=None,
                        help="model workers' torch device (cpu, cuda, cuda:1); a comma-separated list is dealt "
                             "out in turn, prefill workers first: cuda:0,cuda:1")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: this machine's cores shared among the workers; "
                             "0: torch's default)")
    parser.add_argument("--kvstore", action=argparse.BooleanOptionalAction, default=True,
                        help="start the shared KV store for the prefill workers (disaggregated mode)")
    parser.add_argument("--log-dir", default=None, help="also write each service's log to DIR/NAME.log")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds (the first start converts the model)")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")


def run_up(args: argparse.Namespace) -> int:
    kvstore = args.kvstore
    try:
        services = plan(args.mode, args.prefill, args.decode, model=args.model, host=args.host, port=args.port,
                        base_port=args.base_port, kv_cache_gib=args.kv_cache_gib, kvstore=kvstore,
                        log_level=getattr(args, "log_level", None),  # `pdserve --log-level L up`
                        http_port=args.http_port, metrics_port=args.metrics_port, threads=args.threads,
                        device=args.device)
        suite = Suite(services=services, log_dir=args.log_dir, ready_timeout=args.ready_timeout, grace_s=args.grace)
    except (ValueError, SuiteError) as e:
        print(f"pdserve up: {e}", file=sys.stderr)
        return 2
    return supervise(suite)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="pdserve up", description=__doc__)
    add_up_args(parser)
    sys.exit(run_up(parser.parse_args()))
