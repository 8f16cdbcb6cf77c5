"""transformers' own greedy continuation: what every equivalence test compares with."""

from __future__ import annotations

import torch


def transformers_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """`generate(do_sample=False)` of `ids` on the model's own device; the new tokens only."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids) :].tolist()
