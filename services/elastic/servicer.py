"""WorkerControl gRPC servicer: protobuf in, ElasticRole calls, protobuf out."""

from __future__ import annotations

from pdserve.common import convert
from pdserve.elastic.role import ElasticRole
from pdserve.v1 import worker_pb2 as wpb
from pdserve.v1 import worker_pb2_grpc

DEFAULT_DRAIN_S = 120.0


class WorkerControlServicer(worker_pb2_grpc.WorkerControlServicer):
    def __init__(self, role: ElasticRole):
        self.role = role

    async def SetRole(self, request: wpb.SetRoleRequest, context) -> wpb.SetRoleResponse:
        role = convert.elastic_role(request.role)
        s = await self.role.switch(role, request.drain_timeout_ms / 1000 or DEFAULT_DRAIN_S)
        return wpb.SetRoleResponse(
            previous_role=convert.ROLES[s.previous],
            role=convert.ROLES[s.role],
            drained=s.drained,
            drain_ms=s.drain_ms,
            role_epoch=s.epoch,
        )
