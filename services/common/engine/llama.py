"""A Llama-family model's forward as about ten ops a layer, on CPU.

transformers' modules spend ~130 small torch calls a layer (RMSNorm, RoPE, the KV write),
which cost a one-sequence decode step more than its matmuls. Here q/k/v and gate/up are
one matmul each, and the rest are pdserve's fused kernels (kernels/layer_ops.cpp), which
round as the unfused modules do. Why and the figures: docs/engine.md ("Fused layers").
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pdserve.common.engine import attention, kernels, packed_linear, quantize, rows_reach, weight_arena
from pdserve.common.engine.attention import AttentionMetadata

log = logging.getLogger(__name__)


def unsupported(model) -> str:
    """Why `model` can't run fused ("" if it can): only plain Llama-style layers are rebuilt."""
    cfg = model.config
    if getattr(cfg, "hidden_act", "") != "silu":
        return f"activation {getattr(cfg, 'hidden_act', '?')}"
    if getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not laid out as a Llama model"
    for layer in layers:
        a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if a is None or m is None or not all(hasattr(a, n) for n in names) or hasattr(a, "q_norm"):
            return "attention other than Llama's"
        if not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "an MLP other than Llama's"
    return ""


class TiledLinear(nn.Module):
    """A bf16 linear layer over pack_vnni's panels (kernels/linear.cpp), its weight kept only as them:
    through AMX tiles, or on AVX512_BF16 vectors where the CPU has no AMX.

    At every row count the tiles measured at least as fast as oneDNN's packed matmul (1.2x at 128 rows,
    parity at 1,024), with the same bits, so a worker holds one copy of its weights, not two. The
    vectors: 0.81-0.86x oneDNN's time at 1-8 rows, 1.05x at 1,024 (docs/benchmarks.md)."""

    def __init__(self, tiles: torch.Tensor, out_features: int):
        super().__init__()
        self.register_buffer("tiles", tiles, persistent=False)
        self.in_features, self.out_features = tiles.numel() // out_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pdserve.linear_tiles(x, self.tiles, self.out_features)


class RowsLinear(nn.Module):
    """A linear layer without panels, float32 or bf16 (a CPU without AVX512_BF16): up to max_rows rows
    through pdserve's row kernel (kernels/row_kernel.h), more through MKL (rows_reach.beyond). FusedLlama
    sets max_rows from rows_reach, timed on this machine.

    MKL's matmul took 2x its one-row time at 2 to 8 rows (AVX2 and AVX-512 alike), and oneDNN's packed
    weight was no faster at any row count, so the weight is kept once, unpacked (docs/engine.md)."""

    def __init__(self, weight: torch.Tensor, max_rows: int = rows_reach.ALWAYS):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) <= self.max_rows:
            return torch.ops.pdserve.linear_rows(x, self.weight)
        return rows_reach.beyond(x, self.weight)


PANEL_COLUMNS = 16  # a float32 panel's output columns (kernels/float_panels.h: kWidth)


class FloatPanelLinear(nn.Module):
    """A float32 linear layer over 16-column panels (kernels/float_panels.h), its weight kept only as them,
    where the kernels are built for AVX2: on Zen 3, a decode step's matmuls took 0.59-0.76x the row
    kernel's time at 1-1,024 rows and at most MKL's, so it serves every row count (docs/engine.md,
    "float32 panels"). Named `weight`, the panels are what weight_arena gathers."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", torch.ops.pdserve.pack_float_panels(weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pdserve.linear_float_panels(x, self.weight, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The weight's rows `ids`, read from the panels: a tied head's embedding lookup."""
        return self.weight.view(-1, self.in_features, PANEL_COLUMNS)[ids // PANEL_COLUMNS, :, ids % PANEL_COLUMNS]


def float_panels(weight: torch.Tensor, bias) -> bool:
    """Whether a float32 weight goes into panels here: no bias, whole panels, an AVX2 build."""
    return (
        weight.dtype == torch.float32 and bias is None and len(weight) % PANEL_COLUMNS == 0 and kernels.float_panels()
    )


def gate_up_silu(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the MLP's fused gate_up `proj`: one op through tiles, where it has them."""
    if isinstance(proj, TiledLinear):
        return torch.ops.pdserve.gate_up_silu(x, proj.tiles, proj.out_features // 2)
    return torch.ops.pdserve.silu_mul(proj(x))


def qkv_rope_cache(proj: nn.Module, x, cos, sin, meta: AttentionMetadata, layer: int, heads: int, kv_heads: int):
    """q rotated, from the fused q/k/v `proj`; the rotated keys and the values written to their slots."""
    ops = torch.ops.pdserve
    slots = (meta.kv_cache, layer, meta.slot_blocks, meta.slot_offsets, heads, kv_heads)
    # One op where it can: RoPE and the cache write in the matmul's epilogue, which pairs 16 dims of
    # a head's first half with the same 16 of its second, so a head's size must be a multiple of 32.
    if isinstance(proj, TiledLinear) and meta.kv_cache.shape[-1] % 32 == 0:
        return ops.qkv_rope_cache(x, proj.tiles, cos, sin, *slots)
    return ops.rope_cache(proj(x), cos, sin, *slots)


# Rows from which the norm goes into the matmul's epilogue, whose threads then split 32-row groups:
# with fewer, a thread idles (down_proj measured 1.2-1.3x the separate ops at 8 and 32 rows).
NORM_IN_MATMUL_ROWS = 64


def add_rms_norm_after(proj: nn.Module, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual += proj(x); returns the RMSNorm of the new residual (one op through tiles for many rows)."""
    if isinstance(proj, TiledLinear) and len(x) >= NORM_IN_MATMUL_ROWS:
        return torch.ops.pdserve.linear_add_rms_norm(x, proj.tiles, residual, weight, eps)
    return torch.ops.pdserve.add_rms_norm(proj(x), residual, weight, eps)


def panels(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight's pack_vnni panels where the CPU has them (AMX or AVX512_BF16); empty elsewhere, for
    float32, and for a shape they don't take."""
    return torch.ops.pdserve.pack_vnni(weight) if kernels.linear_tiles() else weight[:0]


def _linear(layers: list[nn.Linear], pack: bool, int8: bool) -> nn.Module:
    """One linear layer computing `layers` side by side (their outputs concatenated)."""
    weight = torch.cat([lin.weight.detach() for lin in layers])
    biases = [lin.bias for lin in layers]
    if int8:
        bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
        return quantize.Int8Linear(weight, bias)
    tiles = panels(weight) if biases[0] is None else weight[:0]
    if tiles.numel():
        return TiledLinear(tiles, weight.shape[0])
    if float_panels(weight, biases[0]):
        return FloatPanelLinear(weight)
    # bf16 only where the CPU has no panels at all: a shape they don't take keeps torch's native bf16 matmul.
    rows_dtypes = (torch.float32,) if kernels.linear_tiles() else (torch.float32, torch.bfloat16)
    if weight.dtype in rows_dtypes and biases[0] is None:
        return RowsLinear(weight)
    # Not initialised: its parameters are set from the layers' right away.
    fused = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=biases[0] is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return packed_linear.PackedLinear(fused) if pack else fused


class FusedLayer(nn.Module):
    """A decoder layer's weights, q/k/v and gate/up each fused into one matmul."""

    def __init__(self, layer: nn.Module, pack: bool, int8: bool):
        super().__init__()
        a, m = layer.self_attn, layer.mlp
        self.qkv_proj = _linear([a.q_proj, a.k_proj, a.v_proj], pack, int8)
        self.o_proj = _linear([a.o_proj], pack, int8)
        self.gate_up_proj = _linear([m.gate_proj, m.up_proj], pack, int8)
        self.down_proj = _linear([m.down_proj], pack, int8)
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight


class FusedLlama:
    """The forward of a Llama model whose decoder layers were replaced, in place, by FusedLayers."""

    def __init__(self, model: nn.Module, pack: bool, int8: bool = False):
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight
        inner.layers = nn.ModuleList(FusedLayer(layer, pack, int8) for layer in inner.layers)  # frees the old weights
        self.layers = list(inner.layers)
        if model.dtype == torch.bfloat16:  # float32 logits (kernels/linear.cpp), read from the weight in place
            weight = model.lm_head.weight
            tiles = panels(weight)
            tiles = tiles if tiles.numel() else None
            self.lm_head = lambda h: torch.ops.pdserve.linear_f32(h, weight, tiles)
        elif float_panels(model.lm_head.weight, model.lm_head.bias):
            self.lm_head = FloatPanelLinear(model.lm_head.weight.detach())
            if model.lm_head.weight is self.embed.weight:  # tied: the embedding is read from the head's panels
                self.embed = self.lm_head.rows
                model.lm_head.weight.data = torch.empty(0)  # its storage freed: the panels hold it
        elif model.dtype == torch.float32 and model.lm_head.bias is None:
            self.lm_head = RowsLinear(model.lm_head.weight.detach())  # a tied head reads the embedding in place
        else:
            if pack and not isinstance(model.lm_head, packed_linear.PackedLinear):
                model.lm_head = packed_linear.PackedLinear(model.lm_head)  # a tied head gets its own packed copy
            self.lm_head = model.lm_head
        self.linears = sum(isinstance(m, packed_linear.PackedLinear) for m in model.modules())
        self.tiled = sum(isinstance(m, TiledLinear) for m in model.modules())
        row_layers = [m for m in (*model.modules(), self.lm_head) if isinstance(m, (RowsLinear, FloatPanelLinear))]
        self.arena = weight_arena.gather(row_layers, model)  # in the order a step reads them
        self.float_panels = sum(isinstance(m, FloatPanelLinear) for m in row_layers)
        self.rows, self.rows_reach = len(row_layers) - self.float_panels, rows_reach.ALWAYS
        projections = [p for la in self.layers for p in (la.qkv_proj, la.o_proj, la.gate_up_proj, la.down_proj)]
        in_layers = [p for p in projections if isinstance(p, RowsLinear)]
        if in_layers:  # timed on the widest layer's shape (the head's would take seconds)
            widest = max(in_layers, key=lambda p: p.out_features)
            threads = torch.get_num_threads()
            self.rows_reach = rows_reach.reach(widest.out_features, widest.in_features, threads, widest.weight.dtype)
            for m in row_layers:
                m.max_rows = self.rows_reach
        # Where every matmul has packed panels (AMX tiles or AVX512_BF16 vectors), or the row kernel, a
        # decode step's layers run in one call (kernels/decode_layers.cpp); with the row kernel, only up
        # to rows_reach rows.
        self.decode_weights, self.decode_by_rows = None, False
        if all(isinstance(p, TiledLinear) for p in projections):
            self.decode_weights = [p.tiles for p in projections]
        elif all(isinstance(p, FloatPanelLinear) for p in projections):
            self.decode_weights = [p.weight for p in projections]  # at every row count
        elif all(isinstance(p, RowsLinear) for p in projections):
            self.decode_weights, self.decode_by_rows = [p.weight for p in projections], True
        elif all(isinstance(p, quantize.Int8Linear) and p.bias is None for p in projections):
            self.decode_weights = [t for p in projections for t in (p.qweight, p.scales)]
        self.decode_norms = [w for la in self.layers for w in (la.input_norm, la.post_norm)] + [self.norm]

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, rows: torch.Tensor
    ) -> torch.Tensor:
        """ids, positions [T] -> the logits of `rows` [n, vocab]."""
        ops = torch.ops.pdserve
        x = self.embed(ids)
        cos, sin = (t[0].contiguous() for t in self.rotary(x, positions[None]))
        one_call = not self.decode_by_rows or len(ids) <= self.rows_reach
        if self.decode_weights is not None and meta.decode_only and one_call:
            g = meta.decode_groups[0]
            h = ops.decode_layers(
                x, cos, sin, meta.kv_cache, meta.slot_blocks, meta.slot_offsets, g.block_tables, g.context_lens,
                self.decode_weights, self.decode_norms, self.heads, self.kv_heads, self.scale, self.eps,
            )  # fmt: skip
            return self.lm_head(h[rows])
        residual = x
        h = ops.rms_norm(x, self.layers[0].input_norm, self.eps)
        for i, layer in enumerate(self.layers):
            q = qkv_rope_cache(layer.qkv_proj, h, cos, sin, meta, i, self.heads, self.kv_heads)
            o = attention.attend(q, meta, i, self.scale).view(len(ids), -1)
            h = add_rms_norm_after(layer.o_proj, o, residual, layer.post_norm, self.eps)
            following = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h = add_rms_norm_after(layer.down_proj, gate_up_silu(layer.gate_up_proj, h), residual, following, self.eps)
        return self.lm_head(h[rows])
