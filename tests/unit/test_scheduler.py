"""The scheduler's admission, without a model: what a step takes from the waiting queue and the pool."""

from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.common.engine.sequence import Sequence
from pdserve.common.kv.block_manager import BlockManager

BS = 4


def seq(tokens, rid):
    return Sequence(rid, list(tokens), SamplingParams(), BS)


def test_a_prompt_left_waiting_for_an_unchunked_step_takes_no_block_and_evicts_no_cached_prefix():
    blocks = BlockManager(12, BS, b"fp" * 8)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8, enable_chunked_prefill=False), blocks)
    cached = seq(range(100, 109), "cached")  # two full blocks, then freed: the prefix cache's LRU
    blocks.allocate(cached)
    cached.num_computed_tokens = cached.num_tokens
    blocks.commit_computed(cached)
    blocks.free(cached)
    queries = blocks.prefix_queries
    sched.add(seq(range(4), "short"))
    sched.add(seq(range(200, 240), "long"))  # 10 blocks, past the budget: it waits for a step with no other prompt
    batch = sched.schedule()
    assert [s.request_id for s, _ in batch.prefills] == ["short"]
    assert blocks.num_free_blocks == 12 - 1  # the short prompt's block, nothing held for the long one
    again = seq(range(100, 109), "again")
    assert len(blocks.cached_prefix(again)) == 2  # the cached prefix is still there
    assert blocks.prefix_queries == queries + 4  # the long prompt was not looked up as if it had been admitted


def test_a_sequence_holding_its_imported_kv_passes_a_prompt_that_waits_for_blocks():
    blocks = BlockManager(8, BS, b"fp" * 8)
    sched = Scheduler(SchedulerConfig(), blocks)
    blocks.allocate(seq(range(8), "reserved"))  # another transfer's reservation: 2 blocks
    imported = seq(range(100, 108), "imported")  # its prompt's KV landed, and its first token came with it
    blocks.allocate(imported)
    imported.num_computed_tokens = imported.num_prompt_tokens
    imported.output_token_ids.append(5)
    waits = seq(range(200, 224), "waits")  # 6 blocks (a preempted sequence goes back to the front), 4 free
    sched.waiting.extend([waits, imported])
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n in batch.prefills] == [("imported", 1)]
    assert list(sched.waiting) == [waits] and blocks.num_free_blocks == 3
    # Prompts still go first come first served: a later one that would fit waits behind the first.
    sched.add(seq(range(300, 304), "small"))
    batch = sched.schedule()
    assert batch.decodes == [imported] and batch.prefills == []
    assert [s.request_id for s in sched.waiting] == ["waits", "small"]
