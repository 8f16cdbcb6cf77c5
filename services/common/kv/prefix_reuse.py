"""A worker's use of the KV store around one engine request: start it from the
prefix the store holds, and offer its computed blocks back when it ends.

Both model workers do this: the prefill worker for every prompt, the decode
worker for the requests it prefills itself (colocated, or routed to prefill
locally), so the next turn of a conversation starts from this one's KV
whichever worker it lands on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pdserve.common.engine.async_engine import AsyncEngine
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.sequence import Sequence
from pdserve.common.errors import TransferUnfencedError
from pdserve.common.kv.hashing import block_hashes
from pdserve.common.kv.store_client import StoreClient


async def admit_from_store(
    engine: AsyncEngine,
    store: StoreClient,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    reserve: Callable[[str, list[int]], Sequence],
    hold_blocks: bool,
) -> int:
    """Queue the prompt after loading what the store has beyond the local prefix
    cache; returns the prompt tokens the store provided. `reserve` runs on the
    engine's loop (with the caller's admission check); on any failure the
    reservation is released (quarantined, if the store's push could not be fenced yet)
    before the error propagates."""
    bs = engine.block_size
    seq = await engine.call(reserve, request_id, prompt)
    try:
        # The last prompt token is always computed (its logits are sampled): not loadable.
        hashes = block_hashes(engine.spec.fingerprint, prompt[: (len(prompt) - 1) // bs * bs], bs)
        dest = [engine.pool.block(b) for b in seq.block_table[: len(hashes)]]
        n = await store.load_prefix(hashes, dest, seq.num_cached_tokens // bs)
        await engine.resume(request_id, n * bs, params, hold_blocks=hold_blocks)
    # Shielded: a second cancel here would leave the reservation held, with no lease to end it.
    except TransferUnfencedError as e:  # the store's bytes may still land: its blocks wait for the fence
        await asyncio.shield(engine.quarantine(request_id, e.fenced))
        raise
    except BaseException:
        await asyncio.shield(engine.release(request_id))
        raise
    return n * bs - seq.num_cached_tokens


async def offer_to_store(engine: AsyncEngine, store: StoreClient, request_id: str, tokens: list[int]) -> int:
    """Offer the full blocks of a held request whose KV is computed (`tokens`: its
    prompt, then what it generated); returns how many the store took. The caller
    releases the blocks afterwards."""
    bs = engine.block_size
    computed, table = engine.kv_blocks(request_id)
    full = min(computed, len(tokens)) // bs  # an aborted request offers what it computed, no more
    if full == 0:
        return 0
    hashes = block_hashes(engine.spec.fingerprint, tokens[: full * bs], bs)
    return await store.store_blocks(hashes, [engine.pool.block(b) for b in table[:full]])
