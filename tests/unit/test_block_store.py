"""The KV store's memory: LRU eviction, pins, write states, fingerprints."""

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


def test_a_write_that_could_not_be_fenced_keeps_its_slots_but_not_its_hashes():
    s = BlockStore(3, 4)
    first = s.reserve_write(A, [h(1), h(2)])
    s.quarantine([h(1), h(2)])  # its bytes may still land in those slots
    assert s.used == 2 and s.stats.quarantined == 2
    again = write(s, A, [h(1), h(2)])  # the same blocks, offered again: placed where nothing can land
    assert [i for i, _ in again] == [0] and {slot for _, slot in again}.isdisjoint(slot for _, slot in first)
    assert s.lookup(A, [h(1)]) == 1


async def test_the_service_quarantines_a_released_write_it_cannot_fence(monkeypatch):
    receiver = LoopbackKVReceiver()
    service = KVStoreService(BlockStore(4, 4), receiver, LoopbackKVSender())

    async def unfenced(transfer_id: str) -> bool:
        return False  # a sender died mid-message: its bytes may still land

    monkeypatch.setattr(receiver, "cancel", unfenced)
    placed, ticket = service.reserve_write(A, [h(1), h(2)])
    assert await service.release(ticket.transfer_id)
    assert service.store.stats.quarantined == 2 and service.store.used == 2
    assert service.reserve_write(A, [h(1), h(2)])[0] == [0, 1]  # those blocks may be stored again
