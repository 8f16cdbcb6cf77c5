"""The router's workers: which route each phase, static targets, registration, DNS
discovery and load polls (between polls the router counts what it sent itself).
Why: docs/architecture.md ("Worker registry").
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field

import grpc

from pdserve.common import grpc_tracing, periodic
from pdserve.common.convert import ROLE_NAMES
from pdserve.common.roles import TAKES
from pdserve.common.security import OPEN, SecurityConfig
from pdserve.router.worker_handle import WorkerHandle
from pdserve.v1 import common_pb2 as pb

log = logging.getLogger(__name__)


def split_dns_target(target: str) -> tuple[str, int] | None:
    """`dns:NAME:PORT` -> (NAME, PORT); None for a plain host:port target."""
    if not target.startswith("dns:"):
        return None
    name, _, port = target[4:].rpartition(":")
    if not name or not port.isdigit() or "/" in name:
        raise ValueError(f"{target!r}: a discovered target is dns:NAME:PORT (not gRPC's dns:///NAME:PORT)")
    return name, int(port)


@dataclass
class WorkerPool:
    prefill: list[WorkerHandle] = field(default_factory=list)
    decode: list[WorkerHandle] = field(default_factory=list)
    # Between roles (an elastic worker draining the one it leaves): in neither group, yet still
    # one of ours: polled, heartbeating, found by its registration and its DNS name.
    moving: list[WorkerHandle] = field(default_factory=list)
    poll_s: float = 0.5
    _task: asyncio.Task | None = None

    discovery: list[tuple[str, str]] = field(default_factory=list)  # (role, "dns:NAME:PORT")
    _retiring: dict[asyncio.Task, WorkerHandle] = field(default_factory=dict)  # closing once their calls end
    _unresolved: set[str] = field(default_factory=set)  # dns: targets whose last lookup failed (logged once)
    dns_timeout_s: float = 2.0
    lease_ttl_s: float = 5.0  # a registered worker silent this long is dropped
    security: SecurityConfig = OPEN  # TLS and internal token of the channels to workers
    keepalive_s: float = 10.0  # ping period, and how long an unanswered ping may wait

    def _make(self, target: str, role: str, discovered_by: str = "") -> WorkerHandle:
        ms = int(self.keepalive_s * 1000)
        # Only while calls are open, and without limit: a long prefill sends no data for seconds.
        # gRPC 1.85 fails an unanswered ping after ping_timeout_ms (default 60 s), not after
        # keepalive_timeout_ms alone: measured with a SIGSTOPped server (tests/e2e/test_faults_processes.py).
        keepalive = (
            ("grpc.keepalive_time_ms", ms),
            ("grpc.keepalive_timeout_ms", ms),
            ("grpc.http2.ping_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
        )
        tls = self.security.client_tls()
        if discovered_by and tls and not tls.server_name:  # dialled by address: verify the name looked up
            keepalive += (("grpc.ssl_target_name_override", split_dns_target(discovered_by)[0]),)
        ch = self.security.dial(target, interceptors=grpc_tracing.client_interceptors(), options=keepalive)
        return WorkerHandle(target, role, ch, discovered_by=discovered_by)

    @classmethod
    def connect(
        cls,
        prefill_targets: list[str],
        decode_targets: list[str],
        poll_s: float = 0.5,
        security: SecurityConfig = OPEN,
        keepalive_s: float = 10.0,
    ) -> "WorkerPool":
        pool = cls(poll_s=poll_s, security=security, keepalive_s=keepalive_s)
        for role, targets in (("prefill", prefill_targets), ("decode", decode_targets)):
            for t in targets:
                if split_dns_target(t):
                    pool.discovery.append((role, t))
                else:
                    pool.group(role).append(pool._make(t, role))
        return pool

    def group(self, role: str) -> list[WorkerHandle]:
        return self.prefill if role == "prefill" else self.decode

    def place(self, w: WorkerHandle, role: str, takes: frozenset[str] | None = None) -> None:
        """Route to `w` as `role`: in the prefill group, the decode group or both
        (`takes`: the calls to route to it, if fewer than its role's, as while it drains)."""
        w.role = role
        takes = TAKES[role] if takes is None else takes
        for work, group in (("prefill", self.prefill), ("decode", self.decode)):
            if work in takes and w not in group:
                group.append(w)
            elif work not in takes and w in group:
                group.remove(w)

    def drop(self, w: WorkerHandle) -> None:
        """No longer one of ours (gone, deregistered, out of DNS): routed nothing, a switch under way included."""
        self.place(w, w.role, frozenset())
        if w in self.moving:
            self.moving.remove(w)

    @staticmethod
    def _take_info(w: WorkerHandle, info: pb.WorkerInfo) -> None:
        """A worker's identity, less a role reported before the last switch this router saw
        (a poll answered just before a switch, read just after it). A process started since
        counts its epochs anew: its role is what it says."""
        same_process = w.info is not None and info.instance_id == w.info.instance_id
        if same_process and info.elastic and info.role_epoch < w.info.role_epoch:
            info.role, info.role_epoch = w.info.role, w.info.role_epoch
        w.info = info

    def _follow(self, w: WorkerHandle) -> None:
        """An elastic worker is routed to as the role it reports (another router may have switched it);
        while this router switches it, only for the calls of both roles until it reports the new one."""
        if not w.elastic:
            return
        reported = ROLE_NAMES.get(w.info.role, w.role)
        if w.switching_to and reported != w.switching_to:
            self.place(w, w.role, TAKES[w.role] & TAKES[w.switching_to])
        elif reported != w.role or not all(w in self.group(r) for r in TAKES[reported]):
            self.place(w, reported)

    # -- discovery: every address a DNS name resolves to ----------------------------
    async def discover(self) -> None:
        """Add the workers each dns: target now resolves to; retire those it no longer does."""
        loop = asyncio.get_running_loop()
        for role, target in self.discovery:
            name, port = split_dns_target(target)
            try:  # bounded: a slow DNS must not hold up the load poll it runs in
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(name, port, type=socket.SOCK_STREAM), timeout=self.dns_timeout_s
                )
            except (OSError, TimeoutError) as e:  # DNS down or the name gone: keep what we have
                if target not in self._unresolved:
                    log.warning("discovery: %s did not resolve (%r); keeping its workers", target, e)
                self._unresolved.add(target)
                continue
            self._unresolved.discard(target)
            # One family: a dual-stack Service answers A and AAAA for each pod, one worker each.
            family = socket.AF_INET if any(i[0] == socket.AF_INET for i in infos) else socket.AF_INET6
            found = {
                f"[{i[4][0]}]:{port}" if family == socket.AF_INET6 else f"{i[4][0]}:{port}"
                for i in infos
                if i[0] == family
            }
            have = {w.target for w in self.all if w.discovered_by == target}  # an elastic one may have moved
            for address in sorted(found - have):
                self.group(role).append(self._make(address, role, discovered_by=target))
                log.info("discovery: %s worker at %s (%s)", role, address, target)
            for w in [w for w in self.all if w.discovered_by == target and w.target not in found]:
                self.drop(w)  # no new requests; those in flight keep its channel until they end
                log.info("discovery: %s worker at %s left %s", role, w.target, target)
                self._close_when_idle_later(w)

    def _close_when_idle_later(self, w: WorkerHandle) -> None:
        """Close w's channel once its requests in flight end (closing it now would cancel them)."""
        task = asyncio.create_task(self._close_when_idle(w))
        self._retiring[task] = w
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def _close_when_idle(self, w: WorkerHandle, limit_s: float = 600.0) -> None:
        deadline = time.monotonic() + limit_s
        while w.inflight and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
        await w.channel.close()

    # -- registration: workers that announce themselves --------------------------
    def register(self, info: pb.WorkerInfo, load: pb.WorkerLoad) -> WorkerHandle:
        """Add (or refresh) a worker by its address; idempotent."""
        role = "prefill" if info.role == pb.WORKER_ROLE_PREFILL else "decode"
        w = next((w for w in self.all if w.target == info.address), None)
        if w is None:
            w = self._make(info.address, role)
            self.group(role).append(w)
            log.info("worker %s (%s) registered at %s", info.worker_id, role, info.address)
        self._take_info(w, info)
        w.load, w.healthy, w.registered, w.last_seen = load, True, True, time.monotonic()
        self._follow(w)
        self.mark_twins()
        return w

    def heartbeat(self, worker_id: str, load: pb.WorkerLoad) -> bool:
        w = next((w for w in self.all if w.registered and w.worker_id == worker_id), None)
        if w is None:
            return False
        w.load, w.healthy, w.last_seen = load, True, time.monotonic()  # a role change shows in the next poll
        self.mark_twins()
        return True

    def deregister(self, worker_id: str) -> None:
        """A worker that leaves: a draining one deregisters first, then finishes its requests within
        its grace, so its channel stays open for them (closed at once, they were cut and retried)."""
        for w in [w for w in self.all if w.worker_id == worker_id]:
            self.drop(w)  # no new requests
            self._close_when_idle_later(w)
            log.info("worker %s deregistered", worker_id)

    def expire(self) -> None:
        """Drop registered workers that stopped heartbeating (peer death is
        detected here, above UCX, which runs without its own error handling)."""
        now = time.monotonic()
        for w in [w for w in self.all if w.registered and now - w.last_seen > self.lease_ttl_s]:
            log.warning("worker %s silent for %.1fs: dropped", w.worker_id, now - w.last_seen)
            self.drop(w)
            asyncio.ensure_future(w.channel.close())  # at once: its calls in flight fail now and are retried

    def worker_ids(self) -> set[str]:
        return {w.worker_id for w in self.all}

    @property
    def all(self) -> list[WorkerHandle]:
        """Each worker once (an elastic worker in role both is in both groups)."""
        return list({id(w): w for w in self.prefill + self.decode + self.moving}.values())

    async def refresh(self) -> None:
        async def one(w: WorkerHandle) -> None:
            try:
                t = time.perf_counter()
                w.poll_sent()
                r = await w.load_stub.GetLoad(pb.GetLoadRequest(), timeout=max(1.0, 4 * self.poll_s))
                rtt = (time.perf_counter() - t) * 1e3
                w.rtt_ms = 0.8 * w.rtt_ms + 0.2 * rtt if w.rtt_ms else rtt
                self._take_info(w, r.info)
                w.polled(r.load)
                w.healthy, w.last_seen = True, time.monotonic()
                self._follow(w)
            except grpc.aio.AioRpcError as e:
                if w.healthy:
                    log.warning("worker %s unreachable: %s", w.target, e.code().name)
                w.healthy = False

        await asyncio.gather(*(one(w) for w in self.all))
        self.mark_twins()

    def mark_twins(self) -> None:
        """A worker process reached by two routes (a static target and its own registration,
        or two names resolving to one pod) is routed to through its first healthy route
        only: counted twice, it would draw twice its share of requests. Its identity is
        the instance id it draws at start, not its worker id, which a copied config can repeat."""
        for group in (self.prefill, self.decode):
            first: dict[str, WorkerHandle] = {}
            for w in group:
                instance = w.info.instance_id if w.info else ""
                if not instance or not w.healthy:  # a dead route claims no identity
                    w.twin = False
                    continue
                keeper = first.setdefault(instance, w)
                twin = keeper is not w
                if twin and not w.twin:
                    log.info(
                        "worker %s at %s is also %s: routed through the first only",
                        w.worker_id,
                        w.target,
                        keeper.target,
                    )
                w.twin = twin

    async def start(self) -> None:
        await self.discover()
        await self.refresh()
        self._task = asyncio.create_task(periodic.every(self.poll_s, self._poll, "load-poll"), name="load-poll")

    async def _poll(self) -> None:
        self.expire()
        await self.discover()
        await self.refresh()

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        retiring = list(self._retiring.items())
        for t, _ in retiring:
            t.cancel()
        await asyncio.gather(
            *(w.channel.close() for w in [*self.all, *(w for _, w in retiring)]), return_exceptions=True
        )

    def ready(self) -> bool:
        """A decode worker is reachable: it serves alone too, prefilling locally while no prefill worker is."""
        return any(w.routable for w in self.decode)
