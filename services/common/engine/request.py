"""What the engine keeps per request beside its sequence, and the checks on its way in and out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.common.engine.detokenizer import IncrementalDetokenizer
from pdserve.common.engine.sequence import FinishReason, Sequence
from pdserve.common.errors import InvalidRequestError


@dataclass
class Request:
    """What the engine keeps per request besides the sequence."""

    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    hold_blocks: bool  # keep KV blocks after finishing, until release()


def check_prompt(ids: list[int], max_model_len: int, vocab: int, num_blocks: int, block_size: int) -> None:
    """A prompt the engine can take, or InvalidRequestError naming `prompt`."""
    if not ids:
        raise InvalidRequestError("prompt", "must not be empty")
    if len(ids) >= max_model_len:
        raise InvalidRequestError("prompt", f"{len(ids)} tokens; the context window is {max_model_len}")
    if any(not 0 <= t < vocab for t in ids):
        raise InvalidRequestError("prompt", f"token ids must be in [0, {vocab})")
    need = (len(ids) + block_size) // block_size
    if need > num_blocks:
        raise InvalidRequestError("prompt", f"needs {need} KV blocks; the pool has {num_blocks}")


def finish_reason(
    seq: Sequence, token: int, stopped_by_string: bool, eos_token_ids: set[int], max_model_len: int
) -> FinishReason | None:
    """Whether `token`, just sampled, ends the request, and why."""
    p = seq.params
    if stopped_by_string or token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids):
        return FinishReason.STOP
    if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
