"""A model's KV layout in the pool, and the context the pool can hold."""

from __future__ import annotations

from pdserve.common import model_loader
from pdserve.common.engine.config import EngineConfig
from pdserve.common.kv.pool import blocks_for_bytes
from pdserve.common.kv.spec import KVSpec


def kv_layout(config: EngineConfig, mc, ref: model_loader.ModelRef, dtype: str) -> tuple[KVSpec, int, int]:
    """(the KV spec, the pool's blocks, the longest context) for model config `mc`."""
    spec = KVSpec(
        model_name=ref.name,
        # Quantized weights compute other KV: their workers pair only with their own kind.
        weights_digest=ref.weights_digest
        if config.quantization == "none"
        else f"{ref.weights_digest}+{config.quantization}",
        num_layers=mc.num_hidden_layers,
        num_kv_heads=mc.num_key_value_heads,
        head_dim=getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads,
        block_size=config.block_size,
        dtype=dtype,  # the fingerprint: workers of other dtypes never pair
    )
    num_blocks = config.num_kv_blocks or blocks_for_bytes(spec, config.kv_cache_gib * 2**30)
    # The pool bounds the context too: a sequence grown past the whole pool,
    # once preempted, could never be scheduled again (it would wait forever).
    max_model_len = min(config.max_model_len or mc.max_position_embeddings, num_blocks * config.block_size)
    # Paged attention attends over the whole context. Within a sliding window (Mistral's)
    # that is exactly what the model computes; past it, it would not be: stop at the window.
    window = getattr(mc, "sliding_window", None) if getattr(mc, "use_sliding_window", True) else None
    if window:
        max_model_len = min(max_model_len, window)
    return spec, num_blocks, max_model_len
