"""`pdserve profile`: time real engine steps of known shapes, fit the step model, cache the profile.

Transfers and the router hop are not run here: a block's move costs its bytes
at the memcpy bandwidth measured now, divided by the share of it the KV seam
reached in benchmarks/kv_transfer.py, and the hop is the control-plane
benchmark's figure (docs/benchmarks.md); `Profile.notes` says so.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch

from pdserve.bench.engine_bench import _drain, _prefill, _prompt, decode_step_s
from pdserve.bench.limits import _cpu_name, median_time
from pdserve.common import model_loader
from pdserve.common.engine import precision
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.planner.profile import Profile, StepShape, fit

SEAM_SHARE_OF_MEMCPY = 0.26  # benchmarks/results/kv_transfer.txt: the seam's 3.3 of memcpy's 12.6 GB/s
TRANSFER_BASE_MS = 2.0       # Reserve + ticket + completion: two control-plane calls
ROUTER_HOP_MS = 1.0          # docs/benchmarks.md, `bench control-plane`: 0.84-1.0 ms added at p50


def hardware_key(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    flag = precision.cpu_bf16_flag()
    return f"cpu: {_cpu_name()} ({flag or 'no bf16 matmul'}), {len(os.sched_getaffinity(0))} cores"


def model_key(ref: model_loader.ModelRef) -> str:
    return f"{ref.name}@{ref.weights_digest[:16] or 'undigested'}"


def cache_path(model: str, dtype: str, hardware: str) -> Path:
    root = Path(os.environ.get("PDSERVE_PROFILE_DIR") or Path.home() / ".cache" / "pdserve" / "profiles")
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in f"{model}-{dtype}-{hardware}")
    return root / f"{safe}.json"


def _timed_step(engine: LLMEngine, prompts: list[list[int]], untimed_steps: int = 0) -> float:
    """Add `prompts`, run `untimed_steps`, then time one step (seconds)."""
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=1, ignore_eos=True))
    for _ in range(untimed_steps):
        engine.step()
    t0 = time.perf_counter()
    engine.step()
    return time.perf_counter() - t0


def _best_ms(engine: LLMEngine, reps: int, prompt, untimed_steps: int = 0) -> float:
    """The fastest of `reps` timed steps, each of a fresh prompt on an idle engine (ms)."""
    best = float("inf")
    for _ in range(reps):
        best = min(best, _timed_step(engine, [prompt()], untimed_steps))
        _drain(engine)
    return 1e3 * best


def step_samples(engine: LLMEngine, quick: bool) -> list[tuple[StepShape, float]]:
    """(shape, ms) of real steps: prompt chunks, decode batches, and decodes beside a chunk."""
    reps, steps = (2, 5) if quick else (3, 10)
    chunk = engine.config.max_num_batched_tokens
    samples = []
    salt = iter(range(10**6, 10**7))
    for n in (32, 256) if quick else (32, 128, 512):
        samples.append((StepShape.chunk(n, 0), _best_ms(engine, reps, lambda: _prompt(n, next(salt)))))
    second = _best_ms(engine, reps, lambda: _prompt(2 * chunk, next(salt)), untimed_steps=1)
    samples.append((StepShape.chunk(chunk, chunk), second))
    for b, c in ((1, 64), (4, 256), (16, 128)) if quick else ((1, 64), (1, 512), (4, 256), (16, 128), (16, 512)):
        samples.append((StepShape(decode_seqs=b, decode_context=b * c), 1e3 * decode_step_s(engine, b, c, steps)))
    _prefill(engine, [_prompt(255, next(salt)) for _ in range(4)], 8)
    beside = 1e3 * _timed_step(engine, [_prompt(256, next(salt))])
    samples.append((StepShape(decode_seqs=4, decode_context=4 * 256) + StepShape.chunk(256, 0), beside))
    _drain(engine)
    return samples


def measure(model: str | None = None, device: str = "cpu", dtype: str = "auto", threads: tuple[int, ...] = (),
            quick: bool = False, chunk: int = 512) -> tuple[Profile, dict]:
    """A profile of `model` on `device`, one step model per thread count (default: 1 .. the usable cores,
    powers of two); also every sample, by thread count, for the fit's error."""
    ref = model_loader.resolve(model)
    resolved = precision.resolve(dtype, device).dtype
    loaded, tok = model_loader.load(ref, device=device, dtype=resolved)
    engine = LLMEngine(EngineConfig(num_kv_blocks=1200, dtype=resolved, device=device, max_num_batched_tokens=chunk,
                                    enable_prefix_caching=False), loaded, tok, ref)
    cores = len(os.sched_getaffinity(0))
    counts = threads or (tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= cores) if device == "cpu" else (1,))
    before, models, samples = torch.get_num_threads(), {}, {}
    try:
        for t in counts:
            torch.set_num_threads(t)
            _timed_step(engine, [_prompt(64, t)])  # warm this thread count's pools
            _drain(engine)
            samples[t] = step_samples(engine, quick)
            models[t] = fit(samples[t])
    finally:
        torch.set_num_threads(before)
    block = engine.spec.block_bytes
    src = torch.empty(64 * block // 4, device=device)
    dst = torch.empty_like(src)
    memcpy_gbps = src.numel() * 4 / median_time(lambda: dst.copy_(src), reps=5) / 1e9
    per_block_ms = block / (memcpy_gbps * SEAM_SHARE_OF_MEMCPY * 1e9) * 1e3
    profile = Profile(model_key(ref), resolved, hardware_key(device), engine.spec.block_size, models,
                      transfer_ms_per_block=per_block_ms, transfer_base_ms=TRANSFER_BASE_MS,
                      router_hop_ms=ROUTER_HOP_MS, measured_at=datetime.date.today().isoformat(),
                      notes={"transfer": f"{block} B blocks at {SEAM_SHARE_OF_MEMCPY:.0%} of memcpy "
                                         f"({memcpy_gbps:.1f} GB/s measured)",
                             "router_hop": "docs/benchmarks.md control-plane figure", "quick": quick})
    return profile, samples


def load_or_measure(model: str | None = None, device: str = "cpu", dtype: str = "auto", quick: bool = True,
                    say=print) -> Profile:
    """The cached profile of `model` on this hardware, else one measured now (and cached)."""
    ref = model_loader.resolve(model)
    resolved = precision.resolve(dtype, device).dtype
    key = (model_key(ref), resolved, hardware_key(device))
    path = cache_path(*key)
    if path.exists():
        profile = Profile.load(path)
        profile.require(*key)
        return profile
    say(f"measuring a profile of {ref.name} ({resolved}) on this machine, once; cached at {path}")
    profile, _ = measure(model, device, dtype, quick=quick)
    profile.save(path)
    return profile
