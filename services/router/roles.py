"""Moving an elastic worker to another role, from the router.

The router stops sending it the calls of the role it leaves, the worker
finishes those in flight (WorkerControl.SetRole returns then), and the router
routes the new role's calls to it once the worker reports that role. Nothing
in flight is cancelled, so no request fails across a switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from pdserve.common import convert, metrics, tracing
from pdserve.common.errors import FailedPreconditionError, NotFoundError
from pdserve.common.grpc_errors import relayed_error
from pdserve.common.roles import ELASTIC_ROLES, TAKES
from pdserve.router.worker_pool import WorkerPool
from pdserve.v1 import worker_pb2 as wpb

_spans = tracing.Spans("router", service="router")


@dataclass(frozen=True)
class RoleChange:
    worker_id: str
    previous: str
    role: str
    drained: bool  # False: the drain timeout passed with work of the left role still running (it ran on)
    drain_ms: float


async def switch_role(
    pool: WorkerPool, worker_id: str, role: str, *, reason: str = "operator", drain_timeout_s: float = 120.0
) -> RoleChange:
    if role not in ELASTIC_ROLES:
        raise ValueError(f"role: {role!r}")
    w = next((w for w in pool.all if w.worker_id == worker_id), None)
    if w is None:
        raise NotFoundError(f"no worker {worker_id!r}")
    if not w.elastic:
        raise FailedPreconditionError(
            f"worker {worker_id} is not elastic: only a worker started by `pdserve serve elastic` changes role"
        )
    if w.switching_to:
        raise FailedPreconditionError(f"worker {worker_id} is already moving to {w.switching_to}")
    previous = w.role
    if "decode" not in TAKES[role] and not any(d.routable and d is not w for d in pool.decode):
        raise FailedPreconditionError(f"worker {worker_id} is the last decode worker: another must decode first")
    with _spans.span(
        "router.role_switch", worker_id=worker_id, previous_role=previous, role=role, reason=reason
    ) as span:
        w.switching_to = role
        pool.moving.append(w)  # still ours while in no group: polled, its heartbeats known
        pool.place(w, previous, TAKES[previous] & TAKES[role])  # no new calls of the role it leaves
        try:
            r = await w.control_stub.SetRole(
                wpb.SetRoleRequest(role=convert.ROLES[role], drain_timeout_ms=int(drain_timeout_s * 1000)),
                timeout=drain_timeout_s + 10,
            )
        except BaseException as e:  # a failed call, or this one cancelled
            if w in pool.moving:  # it may or may not have switched: its next load poll says
                pool.place(w, previous)
            if isinstance(e, grpc.aio.AioRpcError):
                raise relayed_error(e) from None
            raise
        finally:
            w.switching_to = ""
            member = w in pool.moving  # not dropped meanwhile (deregistered, expired, out of DNS)
            if member:
                pool.moving.remove(w)
        if member:
            w.info.role, w.info.role_epoch = convert.ROLES[role], r.role_epoch  # older reports are stale now
            pool.place(w, role)
        tracing.annotate(span, drained=r.drained, drain_ms=r.drain_ms)
    if previous != role:
        metrics.ROLE_SWITCHES.add(1, {"from": previous, "to": role, "reason": reason})
    return RoleChange(worker_id, previous, role, r.drained, r.drain_ms)
