"""Linear layers whose weights are packed once for oneDNN, on CPU.

`F.linear` hands oneDNN a row-major weight, which it reorders to its blocked
layout on every call. A decode step reads every weight once, so that reorder
is most of its matmul time: packing at load measured 1.3-2x faster matmuls at
a decode step's shapes, and no slower at a prefill's (docs/engine.md). vLLM's
CPU path prepacks its oneDNN weights the same way.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """nn.Linear's forward over a weight in oneDNN's blocked layout (opaque: no `.weight`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # The batch-size hint only picks a layout; 1 (a decode row) measured as fast for prefills.
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1), persistent=False
        )
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def can_pack(device: str, dtype: torch.dtype) -> bool:
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:  # oneDNN builds without an x86 (or ARM) kernel for this dtype refuse at the first pack
        PackedLinear(nn.Linear(8, 8, bias=False, dtype=dtype))
    except RuntimeError as e:
        log.info("oneDNN cannot pack %s weights here (%s); linear layers stay unpacked", dtype, e)
        return False
    return True


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by a PackedLinear; returns how many.

    A tied LM head gets its own packed copy: the embedding keeps the original."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
