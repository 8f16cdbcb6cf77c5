"""KVStore gRPC servicer: protobuf in, KVStoreService calls, protobuf out."""

from __future__ import annotations

from pdserve.common.errors import InvalidRequestError
from pdserve.common.transfer.base import TransferTicket
from pdserve.kvstore.service import KVStoreService
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import kvstore_pb2 as kpb
from pdserve.v1 import kvstore_pb2_grpc


def _fingerprint(value: bytes) -> bytes:
    if len(value) != 16:
        raise InvalidRequestError("kv_fingerprint", "must be the 16-byte KVSpec fingerprint")
    return value


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, service: KVStoreService):
        self.service = service

    async def Lookup(self, request: kpb.LookupRequest, context) -> kpb.LookupResponse:
        n = self.service.lookup(_fingerprint(request.kv_fingerprint), list(request.block_hashes))
        return kpb.LookupResponse(num_cached_blocks=n)

    async def ReserveWrite(self, request: kpb.ReserveWriteRequest, context) -> kpb.ReserveWriteResponse:
        accepted, t = self.service.reserve_write(
            _fingerprint(request.kv_fingerprint), list(request.block_hashes), request.lease_ms
        )
        out = kpb.ReserveWriteResponse(accepted_indices=accepted)
        if t is not None:
            out.ticket.CopyFrom(
                pb.TransferTicket(
                    transfer_id=t.transfer_id,
                    secret=t.secret,
                    ucx_address=t.address,
                    block_bytes=t.block_bytes,
                    num_blocks=t.num_blocks,
                    kv_fingerprint=request.kv_fingerprint,
                )
            )
        return out

    async def CommitWrite(self, request: kpb.CommitWriteRequest, context) -> kpb.CommitWriteResponse:
        return kpb.CommitWriteResponse(num_committed_blocks=await self.service.commit_write(request.transfer_id))

    async def ReserveRead(self, request: kpb.ReserveReadRequest, context) -> kpb.ReserveReadResponse:
        t = request.ticket
        first = t.first_block_index
        hashes = list(request.block_hashes)[first : first + t.num_blocks]
        ticket = TransferTicket(t.transfer_id, t.secret, t.ucx_address, t.num_blocks, t.block_bytes)
        n = self.service.reserve_read(_fingerprint(request.kv_fingerprint), hashes, ticket)
        return kpb.ReserveReadResponse(num_blocks=n, lease_id=t.transfer_id if n else "")

    async def Release(self, request: kpb.ReleaseLeaseRequest, context) -> kpb.ReleaseLeaseResponse:
        return kpb.ReleaseLeaseResponse(released=await self.service.release(request.lease_id))

    async def GetStats(self, request: kpb.GetStoreStatsRequest, context) -> kpb.GetStoreStatsResponse:
        store, s = self.service.store, self.service.store.stats
        return kpb.GetStoreStatsResponse(
            used_blocks=store.used,
            capacity_blocks=store.capacity,
            block_bytes=store.block_bytes,
            lookups=s.lookups,
            lookup_hit_blocks=s.hit_blocks,
            lookup_miss_blocks=s.miss_blocks,
            blocks_written=s.blocks_written,
            blocks_read=s.blocks_read,
            evictions=s.evictions,
            active_leases=self.service.active_leases,
            bytes_in=s.bytes_in,
            bytes_out=s.bytes_out,
            quarantined_blocks=s.quarantined,
        )
