"""Weight-only int8: a linear layer's weight as int8, one scale per output channel.

Activations stay in bf16. pdserve's panel products widen the int8 weight to bf16 in cache
(kernels/linear.cpp, `linear_int8`): a panel at a time for AMX tiles, where the widening cost what the
halved reads saved, and in registers on AVX512_BF16 vectors, where a decode step's layers took 0.6x
bf16's time (docs/engine.md, "Weight-only int8"). Elsewhere it is refused: torch's
`_weight_int8pack_mm` measured 5x slower than bf16 at 32 rows and 12-15x at 512-1,024. The LM head
keeps bf16, as vLLM keeps it for most methods.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.common.config import SettingError
from pdserve.common.engine import kernels


def check_usable(dtype: torch.dtype) -> None:
    """Refuse int8 where its kernel can't run: it needs bf16 activations and pack_vnni's panels (AMX
    tiles or AVX512_BF16 vectors)."""
    if dtype != torch.bfloat16:
        raise SettingError(
            "quantization",
            f"int8 runs with bfloat16 activations, not {str(dtype).removeprefix('torch.')} (--dtype bfloat16)",
        )
    if not kernels.linear_tiles():
        raise SettingError(
            "quantization", "int8 needs a CPU with AMX (amx_bf16) or AVX512_BF16, and pdserve's kernels built"
        )


class Int8Linear(nn.Module):
    """nn.Linear's forward over a bf16 weight quantized symmetrically, per output channel, to int8."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        n, k = self.out_features, self.in_features = weight.shape
        if n % 16 or k % 32:
            raise SettingError("quantization", f"int8 tiles need layers of 16k x 32k weights, not {n} x {k}")
        w = weight.detach().float()
        # The scale is rounded to bf16 first, as the layer's own weights are, and the int8 values
        # are chosen against it.
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16).float()
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        # pack_vnni's layout, [N/16][K/32][16 pairs of k][16 n][2]
        q = q.view(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous().view(-1)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.pdserve.linear_int8(x.reshape(-1, self.in_features), self.qweight, self.scales)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights over packed panels"


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every nn.Linear of `model` but its LM head, with its parent and name."""
    head = getattr(model, "lm_head", None)
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child is not head
    ]


def quantize_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` but the LM head by an Int8Linear; returns how many."""
    targets = _targets(model)
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child.weight, child.bias))
    return len(targets)


def weight_bytes(model: nn.Module) -> int:
    """The bytes of `model`'s weights once its linear layers but the head are int8 (a decode step reads them)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for _, _, lin in _targets(model):
        w = lin.weight
        total -= w.numel() * w.element_size() - w.numel() - w.shape[0] * w.element_size()  # int8 + a scale a row
    return total
