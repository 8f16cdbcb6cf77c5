"""Engine configuration, shared by every worker that runs the model."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.common.config import SettingError
from pdserve.common.engine.precision import CHOICES

QUANTIZATIONS = ("none", "int8")  # quantize.py


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF directory, .gguf file, hub id, or None for the bundled SmolLM2
    device: str = "cpu"
    dtype: str = "auto"  # or float32, bfloat16, float16 (precision.resolve)
    block_size: int = 16
    kv_cache_gib: float = 1.0  # pool size, unless num_kv_blocks is set
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget = prefill chunk
    enable_chunked_prefill: bool = True  # off: a prompt is prefilled in one step (alone among prompts if too long)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's context window
    pack_weights: bool = True  # CPU: linear weights in oneDNN's layout, packed once at load (packed_linear)
    paged_kernel: bool = True  # CPU: decode attention by pdserve's kernel, built once with g++ (kernels/)
    fused_layers: bool = True  # CPU, Llama-family models: about ten fused ops a layer (llama.py)
    quantization: str = "none"  # or int8: weight-only, a scale per output channel (quantize.py); CPU

    def __post_init__(self) -> None:
        if self.dtype not in CHOICES:
            raise SettingError("dtype", f"must be one of {', '.join(CHOICES)}, not {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise SettingError("quantization", f"must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if self.quantization != "none" and self.device != "cpu":
            raise SettingError("quantization", f"{self.quantization} runs on the CPU only, not on {self.device}")
        if self.block_size < 1:
            raise SettingError("block_size", "must be >= 1")
        if self.kv_cache_gib <= 0:
            raise SettingError("kv_cache_gib", "must be > 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise SettingError("num_kv_blocks", "must be >= 1")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise SettingError(name, "must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise SettingError("max_model_len", "must be >= 2")


def check_device(device: str) -> None:
    """Refuse a device torch cannot use on this machine, before any model loads (a
    config stays valid anywhere: one for a GPU machine can be checked on a laptop).
    Imports torch only for a device other than the CPU (a second or more, ~240 MB)."""
    if device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SettingError("device", "is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        built = " (this torch is built without CUDA)" if dev.type == "cuda" and not torch.version.cuda else ""
        raise SettingError("device", f"needs {dev.type.upper()}, which is not available here{built}")
    count = backend.device_count()
    if dev.index is not None and dev.index >= count:
        raise SettingError(
            "device",
            f"does not exist: this machine has {count} {dev.type} device(s), {dev.type}:0 to {dev.type}:{count - 1}",
        )
