"""Which processes a suite runs, with which command lines, ports and devices."""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from pdserve.common import affinity
from pdserve.common.engine import precision
from pdserve.common.ports import Listen, host_port
from pdserve.router.shutdown import LAST_WORDS_S

MODES = ("disaggregated", "colocated")
WORKER_ROLES = ("prefill", "decode")  # a Service.role that runs an engine (colocated workers are decode)
DEFAULT_PORT = 50051
DEFAULT_BASE_PORT = 50061
DEFAULT_HTTP_PORT = 8000  # the default suite's; a suite on other ports derives its own (plan())
HTTP_PORT_ENV = "PDSERVE_HTTP_PORT"  # the router's own setting (RouterConfig.http_port)


@dataclass(frozen=True)
class Service:
    """One child process. `address` (host:port) answers grpc.health.v1; None
    marks a one-shot step, ready when it exits 0. Stages start in order.
    `metrics` (host:port) serves Prometheus /metrics, and `http` the OpenAI API, when known.
    `listens`: the ports it binds, for the launcher to try before it starts anything.
    `role`: router, prefill, decode (colocated workers too) or kvstore; what a suite can
    serve without (launcher.restarts.usable)."""

    name: str
    argv: tuple[str, ...]
    address: str | None
    stage: int
    metrics: str | None = None
    http: str | None = None
    listens: tuple[Listen, ...] = ()
    role: str = ""


def _dial(host: str, port: int) -> str:
    """The address that reaches a service listening on host:port: a wildcard is not dialable."""
    return host_port("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)


def plan(
    mode: str = "disaggregated",
    prefill: int = 1,
    decode: int = 1,
    *,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    base_port: int = DEFAULT_BASE_PORT,
    kv_cache_gib: float | None = None,
    kvstore: bool = True,
    log_level: str | None = None,
    http_port: int | None = None,
    metrics_port: int = -1,
    threads: int | None = None,
    python: str = sys.executable,
    hosts: Mapping[str, str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    grace_s: float = 15.0,
    chunk: int | None = None,
    elastic: bool = False,
    balance: tuple[str, ...] = (),
    pin: bool | None = None,
) -> list[Service]:
    """The services of a suite, with their command lines; validates the shape.

    hosts: a service's own --host by name (e.g. "prefill-0": one address per
    machine or network namespace); the others use `host`.

    http_port: the router's OpenAI API (0: any free port, -1: none). None: 8000 on
    the default ports; when `port` or `base_port` is moved, the port after the
    suite's highest gRPC port, so that a second suite never reaches for :8000.

    metrics_port: the router's Prometheus port; the other services take the next
    ports, in the order listed. -1 (the default here): no metrics; 0: any free ports.

    device: the model workers' torch device; a comma-separated list is dealt out in
    turn (prefill workers first), e.g. "cuda:0,cuda:1" for one GPU each of two workers.

    dtype: the workers' --dtype (None: theirs, auto); the KV store gets it resolved for the first
    worker's device, so that its blocks are the workers' size. quantization: the workers'
    --quantization (None: theirs, none).

    chunk: the workers' --max-num-batched-tokens (their prefill chunk; None: theirs).

    grace_s: the launcher's time between SIGTERM and SIGKILL; the router and workers drain for that less
    the time its cut requests take to say why (router.shutdown.LAST_WORDS_S), so that a stream
    still open is told, not killed with its router.

    threads: torch threads per model worker; None: this machine's cores shared
    among them (two workers with a thread per core each measured 4x slower to
    start here on 2 cores: their OpenMP pools spin against each other); 0: the worker's own
    (a thread per core it may use)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    prefill = prefill if mode == "disaggregated" else 0  # colocated workers prefill themselves
    if decode < 1:
        raise ValueError("at least one decode worker is needed (--decode)")
    if mode == "disaggregated" and prefill < 1:
        raise ValueError("disaggregated mode needs a prefill worker (--prefill), or use --mode colocated")
    if elastic and mode != "disaggregated":
        raise ValueError("elastic workers move between prefill and decode: they need --mode disaggregated")
    kvstore = kvstore and prefill > 0  # the store serves the disaggregated workers
    store_port = base_port + prefill + decode
    if base_port <= port < store_port + kvstore:
        raise ValueError(f"--port {port} collides with the worker ports from --base-port {base_port}")
    http_port = _http_port(http_port, port, base_port, last=store_port - 1 + kvstore)
    serve = (python, "-m", "pdserve", *(("--log-level", log_level) if log_level else ()), "serve")
    common = ("--model", model) if model else ()
    per_worker = ("--kv-cache-gib", str(kv_cache_gib)) if kv_cache_gib is not None else ()
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // (prefill + decode))
    per_worker += ("--threads", str(threads))
    # Workers drain as long as the router: a rolling restart gives each the launcher's grace (+5 s).
    per_worker += ("--grace-s", f"{max(0.0, grace_s - LAST_WORDS_S):g}")
    cores = _worker_cores(prefill + decode, threads, pin, device)
    per_worker += ("--dtype", dtype) if dtype else ()
    per_worker += ("--quantization", quantization) if quantization else ()
    per_worker += ("--max-num-batched-tokens", str(chunk)) if chunk else ()
    first_device = (device or "cpu").split(",")[0]
    store_dtype = ("--dtype", precision.resolve(dtype or "auto", first_device).dtype)
    services = [
        Service(
            "model",
            (
                python,
                "-c",
                "import sys; from pdserve.common import errors, model_loader as m\n"
                "try: print('model ready:', m.resolve(sys.argv[1] or None).path)\n"
                "except errors.MissingModelError as e: sys.exit(f'pdserve up: {e}')",
                model or "",
            ),
            None,
            0,
        )
    ]
    ports = iter(range(base_port, base_port + prefill + decode + 1))
    targets: dict[str, list[str]] = {"prefill": [], "decode": []}

    def at(name: str) -> str:
        return (hosts or {}).get(name, host)

    store = ("--kvstore", _dial(at("kvstore"), store_port)) if kvstore else ()
    devices = itertools.cycle(device.split(",") if device else [None])
    for role, count in (("prefill", prefill), ("decode", decode)):
        for i in range(count):
            p, name, dev = next(ports), f"{role}-{i}", next(devices)
            extra = ("--role", "colocated") if mode == "colocated" else ("--role", role) * elastic + store
            extra += ("--device", dev) if dev else ()
            command = "elastic" if elastic else role
            services.append(
                Service(
                    name,
                    (
                        *serve,
                        command,
                        "--host",
                        at(name),
                        "--port",
                        str(p),
                        "--worker-id",
                        name,
                        *common,
                        *per_worker,
                        *(("--cpus", cores.pop(0)) if cores else ()),
                        *extra,
                    ),
                    _dial(at(name), p),
                    1,
                    listens=(Listen(at(name), p, "--base-port"),),
                    role=role,
                )
            )
            targets[role].append(_dial(at(name), p))
    if kvstore:
        services.append(
            Service(
                "kvstore",
                (*serve, "kvstore", "--host", at("kvstore"), "--port", str(store_port), *common, *store_dtype),
                _dial(at("kvstore"), store_port),
                1,
                listens=(Listen(at("kvstore"), store_port, "--base-port"),),
                role="kvstore",
            )
        )
    # List flags take one value per target (the config parser's nargs="*").
    pre = ("--prefill-targets", *targets["prefill"]) if prefill else ()
    pre += (*balance, "--balance-threads", str(threads)) if balance else ()  # the role balancer's flags
    router = at("router")
    router_grace = max(0.0, grace_s - LAST_WORDS_S)
    http = (Listen(router, http_port, "--http-port"),) if http_port > 0 else ()  # 0: any free port; -1: none
    services.append(
        Service(
            "router",
            (
                *serve,
                "router",
                "--host",
                router,
                "--port",
                str(port),
                "--mode",
                mode,
                *pre,
                "--decode-targets",
                *targets["decode"],
                *common,
                "--grace-s",
                f"{router_grace:g}",
                "--http-port",
                str(http_port),
            ),
            _dial(router, port),
            2,
            http=_dial(router, http_port) if http else None,
            listens=(Listen(router, port, "--port"), *http),
            role="router",
        )
    )
    return _with_metrics(services, metrics_port, taken={port, http_port, *range(base_port, store_port + 1)})


def _worker_cores(workers: int, threads: int, pin: bool | None, device: str | None) -> list[str]:
    """Each worker's --cpus, or [] when they are not pinned (plan()'s `pin`)."""
    cpus = affinity.available()
    if pin is None:
        pin = device in (None, "cpu") and workers > 1 and 0 < threads and workers * threads <= len(cpus)
    if not pin:
        return []
    if threads < 1 or workers * threads > len(cpus):
        raise ValueError(f"{workers} workers of {threads or 'all'} threads do not fit one to a core on {cpus}")
    return [",".join(map(str, cpus[i * threads : (i + 1) * threads])) for i in range(workers)]


def _http_port(given: int | None, port: int, base_port: int, last: int) -> int:
    """The router's HTTP port: `given`, or derived (plan()); never one of the gRPC ports up to `last`."""
    if given is None:
        moved = (port, base_port) != (DEFAULT_PORT, DEFAULT_BASE_PORT)
        return max(port, last) + 1 if moved else DEFAULT_HTTP_PORT
    if given > 0 and (given == port or base_port <= given <= last):
        raise ValueError(
            f"--http-port {given} collides with the gRPC ports (--port {port}, --base-port {base_port}..{last})"
        )
    return given


def http_port_from(environ: Mapping[str, str]) -> int | None:
    """The router's PDSERVE_HTTP_PORT in `environ`, which the launcher must know to check
    and show the port (its --http-port to the router wins over the variable); None: unset."""
    value = environ.get(HTTP_PORT_ENV)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{HTTP_PORT_ENV} must be a port number, not {value!r}") from None


def _with_metrics(services: list[Service], first: int, taken: set[int | None]) -> list[Service]:
    """Give every service a --metrics-port: the router `first`, the others the next ports."""
    servers = sorted((s for s in services if s.address), key=lambda s: s.name != "router")
    ports = {s.name: first + i if first > 0 else first for i, s in enumerate(servers)}
    if first > 0 and not taken.isdisjoint(ports.values()):
        raise ValueError(
            f"--metrics-port {first}: ports {first}..{first + len(servers) - 1} collide with the gRPC or HTTP ports"
        )

    def placed(s: Service) -> Service:  # beside --port
        at = s.argv.index("--port")
        argv = (*s.argv[:at], "--metrics-port", str(ports[s.name]), *s.argv[at:])
        host = s.argv[s.argv.index("--host") + 1]
        if first <= 0:
            return dataclasses.replace(s, argv=argv)
        return dataclasses.replace(
            s,
            argv=argv,
            metrics=_dial(host, ports[s.name]),
            listens=(*s.listens, Listen(host, ports[s.name], "--metrics-port")),
        )

    return [placed(s) if s.address else s for s in services]
