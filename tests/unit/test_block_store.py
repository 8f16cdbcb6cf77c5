"""The KV store's memory: LRU eviction, pins, write states, fingerprints."""

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
