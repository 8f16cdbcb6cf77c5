"""The KV store's memory: LRU eviction, pins, write states, fingerprints."""

import time

import numpy as np

from pdserve.common.transfer.loopback import LoopbackKVReceiver, LoopbackKVSender
from pdserve.kvstore.service import KVStoreService
from pdserve.kvstore.store import BlockStore

A, B = b"A" * 16, b"B" * 16


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def write(store, fp, hashes):
    placed = store.reserve_write(fp, hashes)
    store.commit([hashes[i] for i, _ in placed])
    return placed


def test_written_blocks_are_found_only_once_committed():
    s = BlockStore(8, 4)
    placed = s.reserve_write(A, [h(1), h(2)])
    assert len(placed) == 2 and s.lookup(A, [h(1), h(2)]) == 0  # still WRITING
    s.commit([h(1), h(2)])
    assert s.lookup(A, [h(1), h(2), h(3)]) == 2


def test_a_block_is_never_served_under_another_fingerprint():
    s = BlockStore(8, 4)
    write(s, A, [h(1), h(2)])
    assert s.lookup(B, [h(1), h(2)]) == 0
    assert s.pin(B, [h(1)]) is None
    assert s.reserve_write(B, [h(1)]) == []  # and B cannot overwrite A's block


def test_lru_evicts_the_least_recently_used_unpinned_block():
    s = BlockStore(2, 4)
    write(s, A, [h(1)])
    write(s, A, [h(2)])
    s.lookup(A, [h(1)])  # h(1) is now more recent than h(2)
    write(s, A, [h(3)])
    assert s.lookup(A, [h(1)]) == 1 and s.lookup(A, [h(2)]) == 0 and s.stats.evictions == 1


def test_pinned_blocks_are_not_evicted_and_full_store_takes_nothing():
    s = BlockStore(2, 4)
    write(s, A, [h(1), h(2)])
    assert s.pin(A, [h(1), h(2)]) is not None
    assert s.reserve_write(A, [h(3)]) == []
    s.unpin([h(1), h(2)], read=True)
    assert len(s.reserve_write(A, [h(3)])) == 1 and s.stats.blocks_read == 2


def test_reads_are_all_or_nothing_and_writes_leave_no_holes():
    s = BlockStore(4, 4)
    write(s, A, [h(1)])
    assert s.pin(A, [h(1), h(2)]) is None
    assert s.lookup(A, [h(1)]) == 1  # the failed pin left nothing pinned: still evictable
    placed = s.reserve_write(A, [h(1), h(2), h(3)])
    assert [i for i, _ in placed] == [1, 2]  # h(1) already held


def test_a_block_another_writer_is_writing_ends_an_offer_so_its_failure_leaves_no_hole():
    s = BlockStore(8, 4)
    first = s.reserve_write(A, [h(1)])  # writer 1, still writing h(1)
    assert s.reserve_write(A, [h(1), h(2)]) == []  # writer 2 would hang h(2) on it
    s.abort_write([h(1)])  # writer 1 failed
    assert s.used == 0 and len(first) == 1


def test_blocks_whose_parent_was_evicted_before_their_commit_are_given_back_not_stored_unreachable():
    s = BlockStore(3, 4)
    write(s, A, [h(1)])
    placed = s.reserve_write(A, [h(1), h(2)])  # h(1) held: only h(2), whose parent it is
    assert [i for i, _ in placed] == [1]
    write(s, A, [h(7)])
    write(s, A, [h(8)])  # another chain's blocks push h(1) out meanwhile
    assert s.lookup(A, [h(1)]) == 0
    assert s.commit([h(2)]) == 0  # unreachable: given back, not kept (and kept longest) as READY
    assert s.used == 2 and s.stats.blocks_written == 3  # h(1), h(7), h(8)


def test_aborted_writes_free_their_slots():
    s = BlockStore(2, 4)
    placed = s.reserve_write(A, [h(1), h(2)])
    s.abort_write([h(1), h(2)])
    assert s.used == 0 and len(placed) == 2


def test_a_chain_is_evicted_leaf_first_so_its_root_outlives_it():
    s = BlockStore(4, 4)
    write(s, A, [h(1), h(2), h(3)])
    write(s, A, [h(9)])
    s.lookup(A, [h(1), h(2), h(3)])  # the chain hit again: h(9) is the oldest now
    write(s, A, [h(10), h(11)])  # room for two: h(9), then the chain's leaf
    assert s.lookup(A, [h(1), h(2), h(3)]) == 2 and s.lookup(A, [h(9)]) == 0


def test_an_offer_never_evicts_its_own_chain_to_make_room():
    s = BlockStore(2, 4)
    write(s, A, [h(1)])  # the chain's root, the oldest block in a full store
    write(s, A, [h(8)])
    assert [i for i, _ in write(s, A, [h(1), h(2)])] == [1]  # the conversation goes on: h(8) made room
    assert s.lookup(A, [h(1), h(2)]) == 2
    assert write(s, A, [h(1), h(2), h(3)]) == []  # the store holds nothing else: no hole at the start
    assert s.lookup(A, [h(1), h(2)]) == 2


def test_a_write_that_could_not_be_fenced_keeps_its_slots_until_it_is_but_not_its_hashes():
    s = BlockStore(3, 4)
    first = s.reserve_write(A, [h(1), h(2)])
    slots = s.quarantine([h(1), h(2)])  # its bytes may still land in those slots
    assert sorted(slots) == sorted(slot for _, slot in first)
    assert s.used == 2 and s.stats.quarantined == 2
    again = write(s, A, [h(1), h(2)])  # the same blocks, offered again: placed where nothing can land
    assert [i for i, _ in again] == [0] and {slot for _, slot in again}.isdisjoint(slots)
    assert s.lookup(A, [h(1)]) == 1
    assert s.reclaim(slots) == 2  # its receives completed after all: the slots are free again
    assert s.used == 1 and s.stats.quarantined == 0
    assert {slot for _, slot in write(s, A, [h(3), h(4)])} == set(slots)


async def test_the_service_quarantines_a_released_write_it_cannot_fence_until_it_is(monkeypatch):
    import asyncio

    receiver = LoopbackKVReceiver()
    service = KVStoreService(BlockStore(4, 4), receiver, LoopbackKVSender())
    fence = asyncio.get_running_loop().create_future()

    async def unfenced(transfer_id: str) -> bool:
        return False  # a sender died mid-message: its bytes may still land

    monkeypatch.setattr(receiver, "cancel", unfenced)
    monkeypatch.setattr(receiver, "when_fenced", lambda transfer_id: fence)
    placed, ticket = service.reserve_write(A, [h(1), h(2)])
    assert await service.release(ticket.transfer_id)
    await asyncio.sleep(0.05)
    assert service.store.stats.quarantined == 2 and service.store.used == 2
    assert service.reserve_write(A, [h(1), h(2)])[0] == [0, 1]  # those blocks may be stored again
    from pdserve.kvstore.servicer import KVStoreServicer
    from pdserve.v1 import kvstore_pb2

    stats = await KVStoreServicer(service).GetStats(kvstore_pb2.GetStoreStatsRequest(), None)
    assert stats.quarantined_blocks == 2  # what used_blocks holds out of use, said over the API too
    fence.set_result(None)  # the write's receives completed: the slots come back
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert service.store.stats.quarantined == 0 and service.store.used == 2  # the second write's


async def test_a_read_ticket_that_does_not_match_its_hashes_or_reuses_a_lease_is_the_clients_error():
    import pytest

    from pdserve.common.errors import InvalidRequestError
    from pdserve.common.transfer.base import TransferTicket

    receiver = LoopbackKVReceiver()
    service = KVStoreService(BlockStore(4, 4), LoopbackKVReceiver(), LoopbackKVSender())
    write(service.store, A, [h(1), h(2)])
    ticket = receiver.expect("r-1", [np.zeros(4, np.uint8), np.zeros(4, np.uint8)])
    for hashes, empty in (([h(1)], ticket), ([], TransferTicket("r-0", b"", "", 0, 4))):
        with pytest.raises(InvalidRequestError, match="num_blocks"):
            service.reserve_read(A, hashes, empty)
    assert service.reserve_read(A, [h(1), h(2)], ticket) == 2
    with pytest.raises(InvalidRequestError, match="already being read"):  # its lease: Release would end the other
        service.reserve_read(A, [h(1), h(2)], ticket)
    await receiver.wait("r-1", 5)
    assert service.active_leases == 0 and service.store.pinned == 0


def test_a_write_lease_is_never_longer_than_the_stores_own():
    service = KVStoreService(BlockStore(4, 4), LoopbackKVReceiver(), LoopbackKVSender(), lease_s=30.0)
    _, ticket = service.reserve_write(A, [h(1)], lease_ms=2**32 - 1)  # 49.7 days asked
    assert service._writes.expiry(ticket.transfer_id) <= time.time() + 30.0
    _, short = service.reserve_write(A, [h(2)], lease_ms=1000)  # less: as asked
    assert service._writes.expiry(short.transfer_id) <= time.time() + 1.0


def test_hashes_a_store_could_never_hold_are_the_clients_error():
    import pytest

    from pdserve.common.errors import InvalidRequestError
    from pdserve.kvstore.service import MAX_CHAIN

    service = KVStoreService(BlockStore(4, 4), LoopbackKVReceiver(), LoopbackKVSender())
    for hashes in ([b""], [h(1), b"short"], [h(i) for i in range(MAX_CHAIN + 1)]):
        with pytest.raises(InvalidRequestError, match="block_hashes"):
            service.lookup(A, hashes)
        with pytest.raises(InvalidRequestError, match="block_hashes"):
            service.reserve_write(A, hashes)
    assert service.store.used == 0 and service.store.stats.lookups == 0
