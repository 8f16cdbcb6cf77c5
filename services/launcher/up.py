"""`pdserve up`'s command line: its flags, and a suite run until a signal or a failure."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from pdserve.common import memory
from pdserve.common.engine import precision
from pdserve.common.engine.config import QUANTIZATIONS
from pdserve.launcher import run_state, up_args
from pdserve.launcher.auto import WORKLOADS, choose, profile_file, resolve_mode
from pdserve.launcher.restarts import RestartPolicy
from pdserve.launcher.suite import Suite, SuiteError
from pdserve.launcher.topology import DEFAULT_BASE_PORT, DEFAULT_HTTP_PORT, DEFAULT_PORT, MODES, http_port_from, plan
from pdserve.planner.commands import add_objective_args, objectives
from pdserve.settings import check_commands


def supervise(suite: Suite, state_file: Path | None = None) -> int:
    """Run a suite until Ctrl-C / SIGTERM (exit 0) or until it can no longer serve
    (exit 1); SIGHUP restarts the workers one at a time. `state_file` is kept for
    `pdserve status` and `pdserve restart`. Must run in the main thread (it installs
    signal handlers)."""
    stop, roll = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            suite.say("second signal: killing every service now")
            suite.kill()
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: roll.set())
    if state_file:
        suite.supervisor.on_change(lambda: run_state.write(state_file, suite))
    try:
        try:
            suite.start(stop)
        except SuiteError as e:
            if stop.is_set():
                suite.say("stopped before the suite was ready")
                return 0
            suite.say(f"failed to start: {e}")
            return 1
        rows = "\n".join(
            f"  {s.name:<10} {s.address}"
            + (f"  OpenAI http://{s.http}/v1" if s.http else "")
            + (f"  metrics http://{s.metrics}/metrics" if s.metrics else "")
            for s in suite.services
            if s.address
        )
        suite.say(f"ready; clients connect to {suite.router_target}\n{rows}")
        code = 1
        try:
            code = suite.wait(stop, roll)
        finally:  # whatever ends the wait (a failed state write too), no service is left running without us
            suite.say("stopping" if code == 0 else "stopping after a failure")
            suite.stop()
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if state_file:
            suite.supervisor.on_change(lambda: None)
            run_state.remove_own(state_file)


def add_up_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=("auto", *MODES),
        default="auto",
        help="separate prefill and decode workers, workers that do both, or auto: what `pdserve "
        "plan` ranks first for this machine's cores, --plan-workload and the objectives "
        "(given --prefill or --decode: disaggregated)",
    )
    parser.add_argument(
        "--prefill", type=int, default=None, metavar="N", help="prefill workers (disaggregated mode; default 1)"
    )
    parser.add_argument(
        "--decode", type=int, default=None, metavar="M", help="decode (or colocated) workers (default 1)"
    )
    parser.add_argument(
        "--elastic",
        action="store_true",
        help="disaggregated workers the router moves between prefill and decode to fit the live "
        "arrival mix, simulating each split with this machine's profile against --slo-ttft-ms "
        "and --slo-tpot-ms (docs/planning.md)",
    )
    parser.add_argument(
        "--plan-workload",
        choices=WORKLOADS,
        default="mixed",
        help="--mode auto: the workload to plan for (bench load's presets)",
    )
    add_objective_args(parser)
    parser.add_argument(
        "--model", default=None, help="HF directory, .gguf file or hub id (org/name) (default: bundled SmolLM2)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address every service listens on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="the router's gRPC port")
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help=f"the router's OpenAI-compatible HTTP port (default: PDSERVE_HTTP_PORT, else "
        f"{DEFAULT_HTTP_PORT} on the default --port and --base-port, else the port after the "
        "suite's highest gRPC port; 0: any free port, -1: none)",
    )
    parser.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help="workers, then the KV store, take consecutive ports from here",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9464,
        help="the router's Prometheus /metrics port; workers and the store take the next ports "
        "(-1: no metrics, 0: any free ports)",
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help=f"KV cache per worker (default: {memory.WORKER_KV}; docs/memory.md)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="model workers' torch device (cpu, cuda, cuda:1); a comma-separated list is dealt "
        "out in turn, prefill workers first: cuda:0,cuda:1 (default: cpu)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=precision.CHOICES,
        help="model workers' weights and KV (default: auto, bfloat16 on CUDA and on CPUs "
        "with AMX or AVX512-BF16, else float32)",
    )
    parser.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="model workers' linear layers: int8 weight-only on CPU (default: none; docs/engine.md)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: this machine's cores shared among the workers; "
        "0: each worker's own, a thread per core it may use)",
    )
    parser.add_argument(
        "--pin-cores",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each CPU worker's engine steps on cores of its own (default: when there are two workers "
        "or more and their threads fit the cores one to a core); the router and KV store float",
    )
    parser.add_argument(
        "--kvstore",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the shared KV store for the prefill workers (disaggregated mode)",
    )
    parser.add_argument("--log-dir", default=None, help="also write each service's log to DIR/NAME.log")
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds (the first start converts the model)"
    )
    parser.add_argument(
        "--restart-limit",
        type=int,
        default=RestartPolicy.limit,
        metavar="N",
        help="a service that exits is started again, with backoff, until it has exited N times "
        "within --restart-window; then it is given up (0: any exit stops the suite)",
    )
    parser.add_argument(
        "--spare",
        action=argparse.BooleanOptionalAction,
        default=RestartPolicy.spare,
        help="keep a worker process imported (~0.4 GB) for a crashed worker to restart in, seconds sooner",
    )
    parser.add_argument(
        "--restart-window",
        type=float,
        default=RestartPolicy.window_s,
        metavar="S",
        help="seconds over which --restart-limit counts exits",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=15.0,
        help="seconds between SIGTERM and SIGKILL; the router and the workers (a rolling restart's too) "
        "drain their streams for this less 5 s, then tell those still open that they are shutting down",
    )


def _services(
    args: argparse.Namespace,
    mode: str,
    prefill: int,
    decode: int,
    threads: int | None,
    chunk: int | None,
    balance: tuple[str, ...] = (),
) -> list:
    services = plan(
        mode,
        prefill,
        decode,
        model=args.model,
        host=args.host,
        port=args.port,
        base_port=args.base_port,
        kv_cache_gib=args.kv_cache_gib,
        kvstore=args.kvstore,
        log_level=getattr(args, "log_level", None),  # `pdserve --log-level L up`
        http_port=http_port_from(os.environ) if args.http_port is None else args.http_port,
        metrics_port=args.metrics_port,
        threads=threads,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        grace_s=args.grace,
        chunk=chunk,
        elastic=args.elastic,
        balance=balance,
        pin=args.pin_cores,
    )
    # Each child's settings (flags, PDSERVE_* variables, file) resolved here as it will resolve them:
    # a bad one is this one line, not a failure in every child.
    check_commands({s.name: s.argv[3:] for s in services if s.argv[1:3] == ("-m", "pdserve")})
    Suite(services=services).check_ports()  # a taken port is a bad setting: refused before anything starts
    return services


def run_up(args: argparse.Namespace) -> int:
    try:
        up_args.check(args)
        up_args.from_worker_settings(args)
    except ValueError as e:
        print(f"pdserve up: {e}", file=sys.stderr)
        return 2
    running = run_state.read(run_state.state_path(args.port))
    if running is not None:  # its ports may still be free while it loads: its state file is not
        print(
            f"pdserve up: a suite already runs on --port {args.port} (pdserve up, pid {running['launcher_pid']}): "
            "stop it, or give this one another --port",
            file=sys.stderr,
        )
        return 2
    mode, threads = resolve_mode(args), args.threads
    prefill, decode = (1 if n is None else n for n in (args.prefill, args.decode))
    try:
        # Settings and ports first, on the default pair, so that a bad one is refused at once, not after a plan.
        services = _services(args, "disaggregated" if mode == "auto" else mode, prefill, decode, threads, None)
        if args.elastic:  # the router's balancer simulates each split with this machine's profile
            profile = profile_file(args, say=lambda m: print(f"pdserve up: {m}", flush=True))
            goal = objectives(args)
            balance = (
                "--balance-profile",
                profile,
                "--slo-ttft-ms",
                f"{goal.ttft_ms:g}",
                "--slo-tpot-ms",
                f"{goal.tpot_ms:g}",
            )
            services = _services(args, mode, prefill, decode, threads, None, balance=balance)
        elif mode == "auto":
            chosen = choose(args, say=lambda m: print(f"pdserve up: {m}", flush=True))
            services = _services(
                args,
                chosen.mode,
                chosen.prefill,
                chosen.decode,
                chosen.threads if threads is None else threads,
                chosen.chunk,
            )
        limit, window = args.restart_limit, args.restart_window
        restarts = RestartPolicy(limit=limit, window_s=window, spare=args.spare) if limit else None
        suite = Suite(
            services=services,
            log_dir=args.log_dir,
            ready_timeout=args.ready_timeout,
            grace_s=args.grace,
            restarts=restarts,
        )
    except (ValueError, SuiteError) as e:
        print(f"pdserve up: {e}", file=sys.stderr)
        return 2
    return supervise(suite, run_state.state_path(args.port))
