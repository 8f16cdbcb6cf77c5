"""A prefill worker's push of one request's KV: its blocks are freed after it, so it ends only when every
send has, failed or not."""

import asyncio

from pdserve.prefill.worker import _Push


async def test_a_push_with_a_failed_send_still_waits_for_the_sends_that_read_its_blocks():
    push = _Push.__new__(_Push)  # the sends alone: what wait() owes the blocks
    push.request_id = "r"
    still_reading = asyncio.Event()

    async def fails():
        raise TimeoutError("chunk 1 timed out")

    async def reads():
        await asyncio.sleep(0.05)
        still_reading.set()

    push.tasks = [asyncio.create_task(fails()), asyncio.create_task(reads())]
    await push.wait()  # a failure is the decode side's to handle: no error here
    assert still_reading.is_set()  # returned only once the send reading the blocks was done
