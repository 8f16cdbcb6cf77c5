"""`pdserve status` and `pdserve restart --rolling`: a running suite, as its router and its launcher see it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

import grpc

from pdserve.common import security
from pdserve.common.auth import TOKEN_KEY, bearer
from pdserve.launcher import run_state
from pdserve.launcher.topology import WORKER_ROLES
from pdserve.v1 import router_pb2
from pdserve.v1.router_pb2_grpc import RouterStub

_ROLES = {0: "", 1: "prefill", 2: "decode", 3: "colocated", 4: "both"}
_COLUMNS = ("name", "role", "address", "health", "running", "waiting", "kv_used", "restarts", "uptime_s", "version")


def add_commands(sub) -> None:
    status = sub.add_parser("status", help="every service of a running suite: health, load, restarts, version")
    status.add_argument("--target", default="localhost:50051", help="the router's gRPC address")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    status.set_defaults(func=run_status)
    restart = sub.add_parser("restart", help="restart a running `pdserve up`'s workers")
    restart.add_argument(
        "--rolling",
        action="store_true",
        required=True,
        help="drain and restart the workers one at a time (the same as SIGHUP to pdserve up)",
    )
    restart.add_argument("--target", default="localhost:50051", help="the suite's router (its port names the suite)")
    restart.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for every worker to be back (0: return at once)",
    )
    restart.set_defaults(func=run_restart)
    role = sub.add_parser("role", help="move an elastic worker to another role (it drains the role it leaves)")
    role.add_argument("worker", help="the worker's id, as `pdserve status` lists it")
    role.add_argument("role", choices=("prefill", "decode", "both"))
    role.add_argument("--target", default="localhost:50051", help="the router's gRPC address")
    role.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds the worker may take to finish the work of the role it leaves",
    )
    role.set_defaults(func=run_role)


def _port(target: str) -> int:
    """The port of HOST:PORT (the suite's state file is named by it); ValueError naming --target."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--target: the router's HOST:PORT, got {target!r}")
    return int(port)


def _here(target: str) -> bool:
    """Whether HOST:PORT names this machine (a loopback address, or its own name)."""
    host = target.rpartition(":")[0].strip("[]")
    return host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::", socket.gethostname(), socket.getfqdn())


def ask_router(target: str, timeout: float = 3.0) -> tuple[list[router_pb2.WorkerStatus] | None, str]:
    """(The router's view of its workers, ""), or (None, why it gave none)."""
    metadata = bearer(os.environ.get("PDSERVE_API_KEY"))  # ListWorkers is client-facing: a key, as the SDK's
    with security.dial(target, security.from_environment(os.environ).client_tls(), sync=True) as channel:
        try:
            request = router_pb2.ListWorkersRequest()
            return list(RouterStub(channel).ListWorkers(request, timeout=timeout, metadata=metadata).workers), ""
        except grpc.RpcError as e:
            why = f"{e.code().name}: {e.details()}"
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                why += " (its API key goes in PDSERVE_API_KEY)"
            return None, why


def list_workers(target: str, timeout: float = 3.0) -> list[router_pb2.WorkerStatus] | None:
    """The router's view of its workers; None when the router does not answer."""
    return ask_router(target, timeout)[0]


def rows(launched: dict | None, workers: list | None) -> list[dict]:
    """One row per service: the launcher's record, completed by the router's."""
    now, out = time.time(), {}
    for s in (launched or {}).get("services", []):
        out[s["name"]] = {
            "name": s["name"],
            "role": s["role"],
            "address": s["address"],
            "health": s["phase"],
            "restarts": s["restarts"],
            "uptime_s": round(now - s["started_at"], 1),
            "version": s["version"],
        }
    for w in workers or []:
        row = out.setdefault(w.info.worker_id, {"name": w.info.worker_id, "address": w.info.address})
        total = w.load.total_blocks
        role = _ROLES.get(w.info.role, row.get("role", "")) + " (elastic)" * w.info.elastic
        row.update(
            role=role,
            running=w.load.running_seqs,
            waiting=w.load.waiting_seqs,
            kv_used=round(1 - w.load.free_blocks / total, 3) if total else None,
        )
        if row.get("health") in (None, "serving"):  # the launcher's phase says more while it is not serving
            row["health"] = "serving" if w.healthy else "unhealthy"
        version = getattr(w.info, "software_version", "")
        if version:
            row["version"] = version
    return [{c: r.get(c) for c in _COLUMNS} for r in out.values()]


def render(table: list[dict]) -> str:
    cells = [[("-" if r[c] is None else str(r[c])) for c in _COLUMNS] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(_COLUMNS)]
    lines = [_COLUMNS, *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def run_status(args: argparse.Namespace) -> int:
    try:
        port = _port(args.target)
    except ValueError as e:
        print(f"pdserve status: {e}", file=sys.stderr)
        return 2
    # The state files are this machine's: another host's router is not the suite one of them names.
    here = _here(args.target)
    launched = run_state.read(run_state.state_path(port)) if here else None
    workers, why = ask_router(args.target)
    table = rows(launched, workers)
    if args.json:
        print(json.dumps({"router": args.target, "router_answers": workers is not None, "services": table}, indent=1))
    else:
        if table:
            print(render(table))
        if workers is None:
            print(f"the router at {args.target} does not answer: {why}", file=sys.stderr)
        if launched is None:
            where = f"on this machine runs a router on port {port}" if here else "here runs that router"
            print(f"no `pdserve up` {where}: restarts and uptime unknown", file=sys.stderr)
    return 0 if workers is not None else 1


def run_restart(args: argparse.Namespace) -> int:
    try:
        port = _port(args.target)
    except ValueError as e:
        print(f"pdserve restart: {e}", file=sys.stderr)
        return 2
    path = run_state.state_path(port)
    launched = run_state.read(path)
    if launched is None:
        print(f"pdserve restart: no `pdserve up` on this machine runs a router on port {port}", file=sys.stderr)
        return 2
    asked = time.time()
    os.kill(launched["launcher_pid"], signal.SIGHUP)
    print(f"asked pdserve up (pid {launched['launcher_pid']}) for a rolling restart; its log shows each step")
    deadline = time.monotonic() + args.wait
    while args.wait > 0:
        state = run_state.read(path) or {}
        workers = [s for s in state.get("services", []) if s["role"] in WORKER_ROLES]
        if workers and not state.get("rolling") and all(s["started_at"] > asked for s in workers):
            print(f"every worker is back, {time.time() - asked:.1f} s after the request")
            return 0
        if time.monotonic() > deadline:
            print(f"pdserve restart: not every worker was back after {args.wait:g}s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


def run_role(args: argparse.Namespace) -> int:
    """Ask the router to move the worker; it answers once the worker has drained the role it left."""
    request = router_pb2.SetWorkerRoleRequest(
        worker_id=args.worker, role=f"WORKER_ROLE_{args.role.upper()}", drain_timeout_ms=int(args.drain_timeout * 1000)
    )
    config = security.from_environment(os.environ)
    # The internal token per call: a blocking channel takes no per-channel metadata.
    metadata = ((TOKEN_KEY, config.internal_token),) if config.internal_token else ()
    with security.dial(args.target, config.client_tls(), sync=True) as channel:
        try:
            r = RouterStub(channel).SetWorkerRole(request, timeout=args.drain_timeout + 15, metadata=metadata)
        except grpc.RpcError as e:
            print(f"pdserve role: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(
        f"{args.worker}: {_ROLES[r.previous_role]} -> {_ROLES[r.role]}, "
        f"{'drained' if r.drained else 'NOT drained (its work of the old role runs on)'} in {r.drain_ms / 1e3:.1f} s"
    )
    return 0
