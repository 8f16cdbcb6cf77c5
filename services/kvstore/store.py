"""The KV block store: prefix-keyed blocks in preallocated CPU memory, LRU.

An entry is WRITING until its transfer verifies, then READY; a push pins the READY entries it reads, and
eviction takes the least recently used READY, unpinned one. A chain is refreshed leaf first, so its
root is the last of it to go (a chain without its root hits nothing). Why: docs/architecture.md ("The KV store").
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pdserve.common.kv import host_memory


class State(enum.Enum):
    WRITING = "writing"
    READY = "ready"


@dataclass
class Entry:
    slot: int
    fingerprint: bytes
    state: State = State.WRITING
    pins: int = 0
    parent: bytes | None = None  # the block before it in the chain it was written in (None: a root)


@dataclass
class StoreStats:
    lookups: int = 0
    hit_blocks: int = 0
    miss_blocks: int = 0
    blocks_written: int = 0
    blocks_read: int = 0
    evictions: int = 0
    quarantined: int = 0  # slots a write that could not be fenced might still fill: out of use until it is
    bytes_in: int = 0
    bytes_out: int = 0


class BlockStore:
    def __init__(self, capacity_blocks: int, block_bytes: int):
        if capacity_blocks < 1 or block_bytes < 1:
            raise ValueError("capacity_blocks and block_bytes must be >= 1")
        self.block_bytes = block_bytes
        self.slots = host_memory.zero_bytes((capacity_blocks, block_bytes))  # huge pages: faster transfers
        self._free = list(range(capacity_blocks - 1, -1, -1))
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()  # LRU order: oldest first
        self.stats = StoreStats()

    @property
    def capacity(self) -> int:
        return self.slots.shape[0]

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def buffer(self, slot: int) -> np.ndarray:
        return self.slots[slot]

    def _ready(self, fingerprint: bytes, h: bytes) -> Entry | None:
        e = self._entries.get(h)
        return e if e is not None and e.state is State.READY and e.fingerprint == fingerprint else None

    def _refresh(self, hashes: list[bytes]) -> None:
        """Most recent: these, the first of them most of all (a child is no use without its parent)."""
        for h in reversed(hashes):
            self._entries.move_to_end(h)

    def lookup(self, fingerprint: bytes, hashes: list[bytes]) -> int:
        """Length of the longest READY prefix of `hashes`; refreshes their recency."""
        n = 0
        for h in hashes:
            if self._ready(fingerprint, h) is None:
                break
            n += 1
        self._refresh(hashes[:n])
        self.stats.lookups += 1
        self.stats.hit_blocks += n
        self.stats.miss_blocks += len(hashes) - n
        return n

    def _evict_one(self, keep: set[bytes]) -> int | None:
        for h, e in self._entries.items():
            if e.state is State.READY and e.pins == 0 and h not in keep:
                del self._entries[h]
                self.stats.evictions += 1
                return e.slot
        return None

    def reserve_write(self, fingerprint: bytes, hashes: list[bytes]) -> list[tuple[int, int]]:
        """Slots for the offered blocks the store lacks: [(index into hashes, slot)].

        Stops at the first block it cannot place: a stored prefix must not have holes.
        """
        self._refresh([h for h in hashes if h in self._entries])
        chain = set(hashes)
        out: list[tuple[int, int]] = []
        for i, h in enumerate(hashes):
            e = self._entries.get(h)
            if e is not None:
                if e.fingerprint != fingerprint or e.state is State.WRITING:
                    # A colliding hash under another fingerprint: never mix. Another writer's block: if its
                    # write fails, the blocks after it would be a hole.
                    break
                continue  # held already
            # Room is never made by evicting this chain's own blocks: its later ones would then hit nothing.
            slot = self._free.pop() if self._free else self._evict_one(keep=chain)
            if slot is None:
                break
            self._entries[h] = Entry(slot, fingerprint, parent=hashes[i - 1] if i else None)
            out.append((i, slot))
        return out

    def commit(self, hashes: list[bytes]) -> int:
        """Make a write's blocks READY, in chain order, as far as each one's parent is still held: one
        evicted since the write was reserved would leave them unreachable (given back instead)."""
        done = 0
        for h in hashes:
            e = self._entries[h]
            if e.parent is not None and e.parent not in self._entries:
                self.abort_write(hashes[done:])
                break
            e.state = State.READY
            done += 1
        self._refresh(hashes[:done])
        self.stats.blocks_written += done
        self.stats.bytes_in += done * self.block_bytes
        return done

    def abort_write(self, hashes: list[bytes]) -> None:
        for h in hashes:
            e = self._entries.get(h)
            if e is not None and e.state is State.WRITING:
                del self._entries[h]
                self._free.append(e.slot)

    def quarantine(self, hashes: list[bytes]) -> list[int]:
        """A write that could not be fenced: its hashes may be written again elsewhere, its slots,
        where its bytes may still land, are out of use until reclaim(). Returns those slots."""
        slots = []
        for h in hashes:
            e = self._entries.get(h)
            if e is not None and e.state is State.WRITING:
                del self._entries[h]
                slots.append(e.slot)
        self.stats.quarantined += len(slots)
        return slots

    def reclaim(self, slots: list[int]) -> int:
        """A quarantine's slots back in use: the write is fenced after all."""
        self._free.extend(slots)
        self.stats.quarantined -= len(slots)
        return len(slots)

    def pin(self, fingerprint: bytes, hashes: list[bytes]) -> list[int] | None:
        """Pin every block (all or none) for a read; their slots in order."""
        entries = [self._ready(fingerprint, h) for h in hashes]
        if any(e is None for e in entries):
            return None
        for e in entries:
            e.pins += 1
        self._refresh(hashes)
        return [e.slot for e in entries]

    def unpin(self, hashes: list[bytes], read: bool) -> None:
        for h in hashes:
            e = self._entries.get(h)
            if e is not None and e.pins > 0:
                e.pins -= 1
        if read:
            self.stats.blocks_read += len(hashes)
            self.stats.bytes_out += len(hashes) * self.block_bytes

    @property
    def pinned(self) -> int:
        return sum(1 for e in self._entries.values() if e.pins)
