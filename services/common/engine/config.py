"""Engine configuration, shared by every worker that runs the model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF directory, .gguf file, hub id, or None for the bundled SmolLM2
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    kv_cache_gib: float = 1.0  # pool size, unless num_kv_blocks is set
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget = prefill chunk
    enable_chunked_prefill: bool = True  # off: a prompt is prefilled in one step (alone among prompts if too long)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's context window

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be > 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
