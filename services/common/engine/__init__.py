"""The engine: a paged-KV, continuously batching runner of a transformers model (docs/engine.md).

`from pdserve.common.engine import LLMEngine, EngineConfig, SamplingParams`:
the names load on first use, so importing this package (or its torch-free
modules, as the router does) never imports torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLMEngine": "engine",
    "RequestOutput": "engine",
    "EngineStats": "engine",
    "EngineConfig": "config",
    "SamplingParams": "sampling_params",
    "FinishReason": "sequence",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
