"""What the engine hands back: per-step request outputs and its load figures."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.common.engine.sequence import FinishReason


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text: str  # the new text since the previous output
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    queued_s: float = 0.0  # arrival to first scheduled


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    reserved: int  # requests holding blocks for KV not yet imported
    held: int  # finished requests whose blocks are still being sent
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of those, found
    computed_tokens: int  # tokens run through the model since start
    preemptions: int
    quarantined_blocks: int = 0  # blocks a transfer not yet fenced might still write (out of use)
