"""Prefill attention through pdserve's kernel against SDPA, each pair of runs alternated in one process.

    .venv/bin/python benchmarks/prefill_attention.py [--tokens 1024] [--reps 40] [--prefills 8]

1. One layer: `torch.ops.pdserve.prefill_attention` on the pool's blocks against what the
   engine ran before it, gathering the blocks and calling SDPA (SmolLM2's 9 query and 3 KV
   heads of 64, bf16, random data).
2. A whole prefill of `--tokens` in the bf16 engine on the bundled model, the model runner's
   `prefill_kernel` switched on and off between prefills.
Medians, with the CPU; needs AMX or AVX512_BF16 (the kernel's homes). docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pdserve.bench.engine_bench import drain, synthetic_prompt
from pdserve.bench.limits import alternated, cpu_name
from pdserve.common import model_loader
from pdserve.common.engine import kernels
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.sampling_params import SamplingParams


def one_layer(tokens: int, reps: int) -> dict[str, float]:
    block, kv_heads, heads, d = 16, 3, 9, 64
    torch.manual_seed(0)
    cache = torch.randn(tokens // block + 8, 2, 2, block, kv_heads, d, dtype=torch.bfloat16)
    ids = torch.randperm(cache.shape[0])[: tokens // block]
    q = torch.randn(tokens, heads, d, dtype=torch.bfloat16)

    def sdpa():
        k, v = (cache[ids, 1, j].reshape(-1, kv_heads, d).transpose(0, 1)[None] for j in (0, 1))
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, is_causal=True, enable_gqa=True)

    def tiles():
        return torch.ops.pdserve.prefill_attention(q, cache, 1, ids, tokens, d**-0.5)

    return alternated({"SDPA with its gathers": sdpa, "pdserve kernel": tiles}, reps)


def whole_prefill(tokens: int, prefills: int) -> dict[str, float]:
    ref = model_loader.resolve(None)
    model, tok = model_loader.load(ref, dtype="bfloat16")
    config = EngineConfig(num_kv_blocks=2400, dtype="bfloat16", max_num_batched_tokens=tokens)
    engine = LLMEngine(config, model, tok, ref)
    engine.pool.tensor.zero_()  # fault the pool in first, as a server that has run a while has it
    runner = engine.runner

    def prefill(kernel: bool):
        def run():
            runner.prefill_kernel = kernel
            engine.add_request(synthetic_prompt(tokens, time.time_ns()), SamplingParams(max_tokens=1))
            drain(engine)

        return run

    return alternated({"SDPA with its gathers": prefill(False), "pdserve kernel": prefill(True)}, prefills)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--prefills", type=int, default=8)
    args = ap.parse_args()
    if not kernels.prefill_kernel(torch.bfloat16, 64):
        raise SystemExit(
            "skipped: this CPU has neither AMX nor AVX512_BF16 (or no kernels built); prefill runs by SDPA here"
        )
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for title, result in (
        (f"one layer, {args.tokens} tokens causal, medians of {args.reps}", one_layer(args.tokens, args.reps)),
        (
            f"whole prefill of {args.tokens} tokens, medians of {args.prefills}",
            whole_prefill(args.tokens, args.prefills),
        ),
    ):
        sdpa, tiles = result["SDPA with its gathers"], result["pdserve kernel"]
        print(f"{title}: SDPA {sdpa:.2f} ms, pdserve kernel {tiles:.2f} ms -> {sdpa / tiles:.2f}x")


if __name__ == "__main__":
    main()
