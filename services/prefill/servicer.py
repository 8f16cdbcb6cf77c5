"""Prefill gRPC servicer: protobuf in, PrefillWorker calls, protobuf out."""

from __future__ import annotations

from collections.abc import Callable

from pdserve.common import convert
from pdserve.common.errors import InvalidRequestError
from pdserve.common.transfer.base import TransferTicket
from pdserve.prefill.worker import PrefillWorker, PushTarget
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import prefill_pb2 as ppb
from pdserve.v1 import prefill_pb2_grpc


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: PrefillWorker, load: Callable[[], pb.GetLoadResponse]):
        self.worker = worker
        self.load = load

    def _target(self, request: ppb.PrefillRequest) -> PushTarget | None:
        if not request.HasField("ticket"):
            return None
        t = request.ticket
        spec = self.worker.engine.spec
        spec.require_peer(t.kv_fingerprint, "ticket.kv_fingerprint", "decode worker")
        if t.block_bytes != spec.block_bytes or t.num_blocks != len(t.dest_block_ids):
            raise InvalidRequestError("ticket", "block size or block count does not match this worker's KV layout")
        ticket = TransferTicket(t.transfer_id, t.secret, t.ucx_address, t.num_blocks, t.block_bytes)
        return PushTarget(ticket, t.first_block_index)

    async def Prefill(self, request: ppb.PrefillRequest, context) -> ppb.PrefillResponse:
        prompt = convert.token_ids(request.prompt_token_ids, "prompt_token_ids")
        params = convert.sampling_from_pb(request.sampling)
        r = await self.worker.prefill(request.request_id, prompt, params, self._target(request))
        return ppb.PrefillResponse(
            request_id=request.request_id,
            first_token_id=r.first_token,
            num_computed_tokens=r.num_computed_tokens,
            num_cached_tokens=r.num_cached_tokens,
            finish_reason=convert.finish_to_pb(r.finish_reason),
            timing=pb.TimingBreakdown(queued_ms=r.queued_ms, prefill_ms=r.prefill_ms),
            kv_bytes_sent=r.kv_bytes_sent,
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context) -> pb.GetLoadResponse:
        return self.load()
