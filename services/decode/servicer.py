"""Decode gRPC servicer: protobuf in, DecodeWorker calls, protobuf out."""

from __future__ import annotations

from collections.abc import Callable

from pdserve.common import convert
from pdserve.common.engine.outputs import RequestOutput
from pdserve.decode.worker import DecodeWorker
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import decode_pb2_grpc


def _response(out: RequestOutput) -> dpb.DecodeResponse:
    r = dpb.DecodeResponse(token_ids=out.new_token_ids, finish_reason=convert.finish_to_pb(out.finish_reason))
    if out.finished:
        r.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=out.num_output_tokens,
                cached_tokens=out.num_cached_tokens,
            )
        )
    return r


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: DecodeWorker, load: Callable[[], pb.GetLoadResponse]):
        self.worker = worker
        self.load = load

    async def Reserve(self, request: dpb.ReserveRequest, context) -> dpb.ReserveResponse:
        prompt = convert.token_ids(request.prompt_token_ids, "prompt_token_ids")
        r = await self.worker.reserve(request.request_id, prompt, request.kv_fingerprint, request.lease_ms)
        ticket = pb.TransferTicket(
            transfer_id=r.ticket.transfer_id,
            secret=r.ticket.secret,
            ucx_address=r.ticket.address,
            dest_block_ids=r.dest_block_ids,
            block_bytes=r.ticket.block_bytes,
            num_blocks=r.ticket.num_blocks,
            first_block_index=r.first_block_index,
            kv_fingerprint=self.worker.spec.fingerprint,
            expires_at_unix_ms=int(r.expires_at * 1000),
        )
        return dpb.ReserveResponse(ticket=ticket, num_cached_tokens=r.num_cached_tokens)

    async def Decode(self, request: dpb.DecodeRequest, context):
        params = convert.sampling_from_pb(request.sampling)
        waited: list[float] = []
        async for out in self.worker.decode(request.request_id, request.first_token_id, params, waited.append):
            r = _response(out)
            if waited:  # the first response says how long the KV took to land
                r.timing.kv_transfer_ms = waited.pop()
            yield r

    async def Generate(self, request: dpb.LocalGenerateRequest, context):
        params = convert.sampling_from_pb(request.sampling)
        prompt = convert.token_ids(request.prompt_token_ids, "prompt_token_ids")
        async for out in self.worker.generate(request.request_id, prompt, params):
            yield _response(out)

    async def Release(self, request: dpb.ReleaseRequest, context) -> dpb.ReleaseResponse:
        return dpb.ReleaseResponse(released=await self.worker.release(request.request_id))

    async def GetLoad(self, request: pb.GetLoadRequest, context) -> pb.GetLoadResponse:
        return self.load()

    async def GetStats(self, request: dpb.GetDecodeStatsRequest, context) -> dpb.GetDecodeStatsResponse:
        c = self.worker.counters
        stats = self.worker.engine.stats()
        return dpb.GetDecodeStatsResponse(
            requests_completed=c.requests_completed,
            requests_aborted=c.requests_aborted,
            tokens_generated=c.tokens_generated,
            transfers_completed=c.transfers_completed,
            transfers_failed=c.transfers_failed,
            transfers_timed_out=c.transfers_timed_out,
            kv_bytes_received=c.kv_bytes_received,
            reservations_expired=self.worker.reservations_expired,
            reservations_active=self.worker.active_reservations,
            preemptions=stats.preemptions,
            prefix_cached_tokens=stats.prefix_hits,
        )
