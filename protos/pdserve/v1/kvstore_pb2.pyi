from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("kv_fingerprint", "block_hashes")
    KV_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    kv_fingerprint: bytes
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, kv_fingerprint: _Optional[bytes] = ..., block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_cached_blocks",)
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_cached_blocks: int
    def __init__(self, num_cached_blocks: _Optional[int] = ...) -> None: ...

class ReserveWriteRequest(_message.Message):
    __slots__ = ("kv_fingerprint", "block_hashes", "lease_ms")
    KV_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    kv_fingerprint: bytes
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    lease_ms: int
    def __init__(self, kv_fingerprint: _Optional[bytes] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class ReserveWriteResponse(_message.Message):
    __slots__ = ("accepted_indices", "ticket")
    ACCEPTED_INDICES_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    accepted_indices: _containers.RepeatedScalarFieldContainer[int]
    ticket: _common_pb2.TransferTicket
    def __init__(self, accepted_indices: _Optional[_Iterable[int]] = ..., ticket: _Optional[_Union[_common_pb2.TransferTicket, _Mapping]] = ...) -> None: ...

class CommitWriteRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class CommitWriteResponse(_message.Message):
    __slots__ = ("num_committed_blocks",)
    NUM_COMMITTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_committed_blocks: int
    def __init__(self, num_committed_blocks: _Optional[int] = ...) -> None: ...

class ReserveReadRequest(_message.Message):
    __slots__ = ("kv_fingerprint", "block_hashes", "ticket")
    KV_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    kv_fingerprint: bytes
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    ticket: _common_pb2.TransferTicket
    def __init__(self, kv_fingerprint: _Optional[bytes] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., ticket: _Optional[_Union[_common_pb2.TransferTicket, _Mapping]] = ...) -> None: ...

class ReserveReadResponse(_message.Message):
    __slots__ = ("num_blocks", "lease_id")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    lease_id: str
    def __init__(self, num_blocks: _Optional[int] = ..., lease_id: _Optional[str] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class GetStoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStoreStatsResponse(_message.Message):
    __slots__ = ("used_blocks", "capacity_blocks", "block_bytes", "lookups", "lookup_hit_blocks", "lookup_miss_blocks", "blocks_written", "blocks_read", "evictions", "active_leases", "bytes_in", "bytes_out", "quarantined_blocks")
    USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_MISS_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_READ_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    used_blocks: int
    capacity_blocks: int
    block_bytes: int
    lookups: int
    lookup_hit_blocks: int
    lookup_miss_blocks: int
    blocks_written: int
    blocks_read: int
    evictions: int
    active_leases: int
    bytes_in: int
    bytes_out: int
    quarantined_blocks: int
    def __init__(self, used_blocks: _Optional[int] = ..., capacity_blocks: _Optional[int] = ..., block_bytes: _Optional[int] = ..., lookups: _Optional[int] = ..., lookup_hit_blocks: _Optional[int] = ..., lookup_miss_blocks: _Optional[int] = ..., blocks_written: _Optional[int] = ..., blocks_read: _Optional[int] = ..., evictions: _Optional[int] = ..., active_leases: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., quarantined_blocks: _Optional[int] = ...) -> None: ...
