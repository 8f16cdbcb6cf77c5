"""Router gRPC servicer: GenerateRequest in, Router events, GenerateResponse out.

Generate writes with context.write rather than yielding, so a shutdown cut lands inside its
scope wherever the call waits (on a worker or on a slow client) and ends it UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import time

from pdserve.common import convert
from pdserve.common.errors import InvalidRequestError
from pdserve.router.chat import chat_role
from pdserve.router.models import check_model
from pdserve.router.plan import pairing_gap
from pdserve.router.prompt import GenerateInput
from pdserve.router.request_metrics import RequestMetrics
from pdserve.router.roles import switch_role
from pdserve.router.router import Event, Router
from pdserve.router.shutdown import Shutdown
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import router_pb2 as rpb
from pdserve.v1 import router_pb2_grpc


def request_to_input(req: rpb.GenerateRequest, default_max_tokens: int) -> GenerateInput:
    params = convert.sampling_from_pb(req.sampling, default_max_tokens)
    which = req.WhichOneof("prompt")
    return GenerateInput(
        params=params,
        request_id=req.request_id,
        model=req.model,
        text=req.text if which == "text" else None,
        token_ids=req.token_ids.ids if which == "token_ids" else None,
        messages=[
            {"role": chat_role(m.role, f"prompt.chat.messages[{i}].role"), "content": m.content}
            for i, m in enumerate(req.chat.messages)
        ]
        if which == "chat"
        else None,
    )


def event_to_response(ev: Event) -> rpb.GenerateResponse:
    r = rpb.GenerateResponse(
        request_id=ev.request_id,
        token_ids=ev.token_ids,
        text=ev.text,
        finish_reason=convert.finish_to_pb(ev.finish_reason),
    )
    if ev.usage:
        u = ev.usage
        r.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens
            )
        )
    if ev.timing:
        r.timing.CopyFrom(pb.TimingBreakdown(**ev.timing))
    if ev.route:
        r.route.CopyFrom(
            rpb.RouteInfo(
                prefill_worker_id=ev.route.prefill_worker_id,
                decode_worker_id=ev.route.decode_worker_id,
                disaggregated=ev.route.disaggregated,
            )
        )
    return r


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        router: Router,
        default_max_tokens: int,
        measured: RequestMetrics | None = None,
        shutdown: Shutdown | None = None,
    ):
        self.router = router
        self.default_max_tokens = default_max_tokens
        self.measured = measured or RequestMetrics()
        self.shutdown = shutdown or Shutdown()  # shared with the HTTP front end

    async def Generate(self, request: rpb.GenerateRequest, context) -> None:
        with self.measured.refusals():
            self.shutdown.admit()
            inp = request_to_input(request, self.default_max_tokens)
            check_model(self.router.pool, request.model)
        remaining = context.time_remaining()  # None: the client set no deadline
        if remaining is not None:
            inp.deadline = time.monotonic() + remaining
        async with self.shutdown.scope():
            events = self.measured.observe(self.router.generate(inp), self.router.genai_attributes(inp))
            async with contextlib.aclosing(events):
                async for ev in events:
                    await context.write(event_to_response(ev))

    async def RegisterWorker(self, request: rpb.RegisterWorkerRequest, context) -> rpb.RegisterWorkerResponse:
        pool = self.router.pool
        pool.register(request.info, request.load)
        return rpb.RegisterWorkerResponse(
            heartbeat_interval_ms=int(pool.poll_s * 1000), lease_ttl_ms=int(pool.lease_ttl_s * 1000)
        )

    async def Heartbeat(self, request: rpb.HeartbeatRequest, context) -> rpb.HeartbeatResponse:
        return rpb.HeartbeatResponse(known=self.router.pool.heartbeat(request.worker_id, request.load))

    async def DeregisterWorker(self, request: rpb.DeregisterWorkerRequest, context) -> rpb.DeregisterWorkerResponse:
        self.router.pool.deregister(request.worker_id)
        return rpb.DeregisterWorkerResponse()

    async def ListWorkers(self, request: rpb.ListWorkersRequest, context) -> rpb.ListWorkersResponse:
        out = rpb.ListWorkersResponse()
        for w in self.router.pool.all:
            if w.info and request.role in (pb.WORKER_ROLE_UNSPECIFIED, w.info.role):
                out.workers.add(info=w.info, load=w.load, healthy=w.healthy, unpaired=pairing_gap(self.router.pool, w))
        return out

    async def SetWorkerRole(self, request: rpb.SetWorkerRoleRequest, context) -> rpb.SetWorkerRoleResponse:
        role = convert.elastic_role(request.role)
        if not request.worker_id:
            raise InvalidRequestError("worker_id", "must name a worker (ListWorkers lists them)")
        c = await switch_role(
            self.router.pool, request.worker_id, role, drain_timeout_s=request.drain_timeout_ms / 1000 or 120.0
        )
        return rpb.SetWorkerRoleResponse(
            previous_role=convert.ROLES[c.previous], role=convert.ROLES[c.role], drained=c.drained, drain_ms=c.drain_ms
        )
