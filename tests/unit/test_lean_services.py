"""The router and the KV store come up without torch or transformers: each is built, as its
entry point builds it, in a fresh interpreter that then lists what it imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "accelerate", "safetensors")
ROUTER = """
from pdserve.router.config import RouterConfig
from pdserve.router.serve import RouterRuntime
runtime = RouterRuntime(RouterConfig(mode="colocated", decode_targets=["127.0.0.1:1"], port=0, http_port=-1))
assert len(runtime.router.tokenizer) > 1000 and runtime.router.max_model_len > 1000
"""
KVSTORE = """
from pdserve.kvstore.config import KVStoreConfig
from pdserve.kvstore.serve import build
server, port, service = build(KVStoreConfig(port=0, capacity_blocks=4))
assert service.store.buffer(0).nbytes == service.store.block_bytes > 0
"""
REPORT = f"\nimport json, sys; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"


def heavy_modules_loaded(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code + REPORT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def model_files():
    """The bundled model's files on disk, as `pdserve up`'s model step leaves them: the
    GGUF's one-time conversion is a worker's job (it needs torch)."""
    from pdserve.common import model_loader

    return model_loader.resolve(weights=False).path


@pytest.mark.parametrize("code", [ROUTER, KVSTORE], ids=["router", "kvstore"])
def test_the_service_is_built_without_torch_or_transformers(model_files, code):
    assert heavy_modules_loaded(code) == []


def test_the_check_sees_torch_where_it_is_loaded():
    assert heavy_modules_loaded(
        "from pdserve.common.kv import host_memory; host_memory.zeros((2,), __import__('torch').float32)"
    ) == ["torch"]
