"""Background loops outlive a failed round: a lease sweeper that stopped would leave every later
reservation to hold its blocks for ever."""

from __future__ import annotations

import asyncio

from pdserve.common import periodic
from pdserve.common.leases import Leases


async def test_a_round_that_raises_is_logged_and_the_next_one_runs(caplog):
    rounds = []

    async def round_():
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("a bad round")

    task = asyncio.create_task(periodic.every(0.01, round_, "test-loop"))
    while len(rounds) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    assert "test-loop: a round failed" in caplog.text and "a bad round" in caplog.text


async def test_a_lease_whose_release_fails_leaves_the_others_freed_and_is_tried_again():
    released, attempts = [], {"bad": 0}

    async def release(key: str) -> None:
        if key == "bad" and attempts["bad"] < 2:
            attempts["bad"] += 1
            raise RuntimeError("release failed")
        leases.pop(key)
        released.append(key)

    leases: Leases[int] = Leases(release, "test", interval_s=0.01)
    leases.add("bad", 1, ttl_s=0.0)
    leases.add("good", 2, ttl_s=0.0)
    leases.start()
    try:
        for _ in range(200):
            if len(released) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        leases.stop()
    assert released[0] == "good" and set(released) == {"good", "bad"} and attempts["bad"] == 2
    assert leases.expired == 2 and len(leases) == 0


async def test_a_lease_claimed_while_the_sweeper_awaits_another_release_is_not_freed():
    # The KV store's commit claims its write lease; a sweep that had seen it expired, and was
    # meanwhile awaiting another lease's release (up to seconds: a UCX fence), must not free it.
    released, claimed = [], asyncio.Event()

    async def release(key: str) -> None:
        if key == "slow":
            leases.claim("committing")  # what CommitWrite does, while this release is awaited
            claimed.set()
        leases.pop(key)
        released.append(key)

    leases: Leases[int] = Leases(release, "test", interval_s=0.01)
    leases.add("slow", 1, ttl_s=0.0)
    leases.add("committing", 2, ttl_s=0.0)
    leases.start()
    try:
        await asyncio.wait_for(claimed.wait(), 5)
        await asyncio.sleep(0.1)  # several more sweeps
    finally:
        leases.stop()
    assert released == ["slow"] and leases.get("committing") == 2
