"""`pdserve profile`: time real engine steps of known shapes (read from the scheduler's
batch), fit the step model, cache the profile. KV moves and the router hop are not run
here (docs/planning.md, "Profiles").
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from pdserve.bench.engine_bench import drain, prefill_all, synthetic_prompt
from pdserve.bench.limits import cpu_name, median_time
from pdserve.common import model_loader
from pdserve.common.engine import kernels, precision
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.scheduler import ScheduledBatch
from pdserve.planner import profile as profile_module
from pdserve.planner.profile import Profile, StepModel, StepShape, fit, model_key

log = logging.getLogger(__name__)

SEAM_SHARE_OF_MEMCPY = 0.26  # benchmarks/results/kv_transfer.txt: the seam's 3.3 of memcpy's 12.6 GB/s
TRANSFER_BASE_MS = 2.0  # Reserve + ticket + completion: two control-plane calls
ROUTER_HOP_MS = 1.0  # docs/benchmarks.md, `bench control-plane`: 0.84-1.0 ms added at p50
# A quiet host fits its own samples within 4-9% (mean); a fit worse than this was timed beside
# other work, so its samples are timed again, up to TRIES times in all, and the best fit is kept.
REMEASURE_ABOVE, TRIES = 0.25, 3

Sample = tuple[StepShape, float]  # a step's shape and its milliseconds


def hardware_key(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}, engine {engine_build()}"
    flag = precision.cpu_bf16_flag()
    return (
        f"cpu: {cpu_name()} ({flag or 'no bf16 matmul'}), {len(os.sched_getaffinity(0))} cores, engine {engine_build()}"
    )


def engine_build() -> str:
    """The kernels' build (their sources, flags and torch) and the engine's Python: a faster engine is new
    hardware to plan on, and a change on either side has made one (the row kernel's reach is Python's).
    Also how a profile is measured and fitted (this module, profile.py): a profile of the old method
    would keep planning on its old misfit."""
    key = hashlib.sha256(kernels.library_path().stem.encode())
    for path in sorted(Path(kernels.__file__).parents[1].glob("*.py")) + [
        Path(__file__),
        Path(profile_module.__file__),
    ]:
        key.update(path.read_bytes())
    return key.hexdigest()[:8]


def cache_path(model: str, dtype: str, hardware: str) -> Path:
    root = Path(os.environ.get("PDSERVE_PROFILE_DIR") or Path.home() / ".cache" / "pdserve" / "profiles")
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in f"{model}-{dtype}-{hardware}")
    return root / f"{safe}.json"


def batch_shape(batch: ScheduledBatch) -> StepShape:
    """What a scheduled batch computes; read before it runs (a decode attends its whole sequence)."""
    shape = StepShape(
        decode_seqs=len(batch.decodes), decode_context=sum(s.num_computed_tokens + 1 for s in batch.decodes)
    )
    for seq, n in batch.prefills:
        shape = shape + StepShape.chunk(n, seq.num_computed_tokens)
    return shape


class _Stepper:
    """Times single engine steps and records the shape of each, by wrapping this engine's scheduler."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.shape = StepShape()
        self.salt = itertools.count(10**6)
        schedule = engine.scheduler.schedule

        def recorded() -> ScheduledBatch:
            batch = schedule()
            self.shape = batch_shape(batch)
            return batch

        engine.scheduler.schedule = recorded  # an instance attribute: `close` restores the class's

    def close(self) -> None:
        del self.engine.scheduler.schedule

    def add(self, tokens: int, max_tokens: int = 1) -> None:
        """A fresh prompt: salted, so no two share a prefix even where the prefix cache is on."""
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(synthetic_prompt(tokens, next(self.salt)), params)

    def step(self) -> Sample:
        t0 = time.perf_counter()
        self.engine.step()
        return self.shape, 1e3 * (time.perf_counter() - t0)

    def decoding(self, seqs: int, context: int, max_tokens: int) -> list[str]:
        """`seqs` fresh prompts of `context` - 1 tokens, brought to decoding without computing their KV
        (`_unmodelled`); their request ids."""
        with _unmodelled(self.engine):
            prompts = [synthetic_prompt(context - 1, next(self.salt)) for _ in range(seqs)]
            prefill_all(self.engine, prompts, max_tokens)
        return [s.request_id for s in self.engine.scheduler.running]


@contextlib.contextmanager
def _unmodelled(engine: LLMEngine):
    """Steps scheduled as usual but not run: their sequences get token 0 and their KV blocks keep the
    pool's zeros. A decode step takes as long whatever values it attends, and computing 32 x 512 prompt
    tokens only to set up a decode sample would take a minute on 2 cores."""
    vocab = engine.runner.model.config.vocab_size

    def skipped(batch: ScheduledBatch) -> tuple[list, torch.Tensor | None]:
        caught_up = [s for s, n in batch.prefills if s.num_computed_tokens + n == s.num_tokens]
        seqs = batch.decodes + caught_up
        return (seqs, torch.zeros(len(seqs), vocab, device=engine.runner.device)) if seqs else ([], None)

    engine.runner.run = skipped  # an instance attribute: deleting it restores the class's
    try:
        yield
    finally:
        del engine.runner.run


def _median(group: list[Sample]) -> Sample:
    """The median time, with the middle step's shape (contexts grow by a token a step). Groups are
    odd, so the median is a step that ran, and one step slowed by another process is outvoted."""
    return group[len(group) // 2][0], statistics.median(ms for _, ms in group)


DECODE_SETS = ((16, 64, 128, (16, 4, 1)), (32, 512, 256, (32, 8, 1)), (4, 2048, 256, (4, 1)))
"""(sequences, context, the prompt chunk timed beside them, the batches they shrink to): from the one
sequence a weight read bounds to the 32 that pay their matmuls, and 64-2,048 tokens of context each."""


def step_samples(engine: LLMEngine, quick: bool) -> list[Sample]:
    """(shape, median ms) of real steps: prompt chunks alone, decode batches (DECODE_SETS), and decodes
    beside a prompt chunk. Batches shrink by aborting sequences, so each set is brought to decoding once."""
    reps, steps = (3, 5) if quick else (3, 9)
    chunk = engine.config.max_num_batched_tokens
    run, samples = _Stepper(engine), []
    try:
        for n in (32, 128):
            group = []
            for _ in range(reps):
                run.add(n)
                group.append(run.step())
                drain(engine)
            samples.append(_median(group))
        firsts, seconds = [], []  # a two-chunk prompt: its first chunk, then a chunk after one
        for _ in range(reps):
            run.add(2 * chunk)
            firsts.append(run.step())
            seconds.append(run.step())
            drain(engine)
        samples += [_median(firsts), _median(seconds)]
        for seqs, context, beside, batches in DECODE_SETS:
            # set-up steps at most (each a token to those already decoding, whose decodes share the chunk)
            setup = -(-seqs * context // (chunk - seqs))
            tokens = setup + len(batches) * (steps + 1) + reps + 8
            ids = run.decoding(seqs, min(context, engine.max_model_len - tokens), tokens)  # within a short window
            for keep in batches:
                for rid in ids[keep:]:
                    engine.abort(rid)
                del ids[keep:]
                run.step()  # untimed: the first step after a change of batch
                samples.append(_median([run.step() for _ in range(steps)]))
                if keep == seqs:  # the same decodes beside a fresh prompt's chunk (it finishes in that step)
                    group = []
                    for _ in range(reps):
                        run.add(beside)
                        group.append(run.step())
                    samples.append(_median(group))
            for rid in ids:
                engine.abort(rid)
    finally:
        run.close()
    return samples


def _fitted(engine: LLMEngine, quick: bool) -> tuple[StepModel, list[Sample]]:
    """The step model and its samples at the current thread count: the best fit of up to TRIES."""
    best = None
    for _ in range(TRIES):
        samples = step_samples(engine, quick)
        model = fit(samples)
        error = _errors(model, samples)[0]
        if best is None or error < best[0]:
            best = error, model, samples
        if error <= REMEASURE_ABOVE:
            break
        log.warning("step model fits its samples within %.0f%% (mean): timing them again", 100 * error)
    return best[1], best[2]


def _errors(model: StepModel, samples: list[Sample]) -> tuple[float, float]:
    errors = [abs(model.ms(shape) - ms) / ms for shape, ms in samples]
    return statistics.mean(errors), max(errors)


def memcpy_gbps(nbytes: int, device: str) -> float:
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return src.numel() * 4 / median_time(lambda: (dst.copy_(src), sync()), reps=5) / 1e9


def measure(
    model: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    threads: tuple[int, ...] = (),
    quick: bool = False,
    chunk: int = 512,
) -> tuple[Profile, dict[int, list[Sample]]]:
    """A profile of `model` on `device`, one step model per thread count (default: 1 .. the usable cores,
    powers of two); also every sample, by thread count, for the fit's error."""
    largest = max(seqs for seqs, *_ in DECODE_SETS)
    if chunk <= largest:  # its decodes alone would fill every step: the prompts would never be set up
        raise ValueError(f"chunk must be over {largest} tokens (the largest decode batch), not {chunk}")
    ref = model_loader.resolve(model)
    resolved = precision.resolve(dtype, device).dtype
    loaded, tok = model_loader.load(ref, device=device, dtype=resolved)
    engine = LLMEngine(
        EngineConfig(
            num_kv_blocks=1600, dtype=resolved, device=device, max_num_batched_tokens=chunk, enable_prefix_caching=False
        ),
        loaded,
        tok,
        ref,
    )
    cores = len(os.sched_getaffinity(0))
    counts = threads or (tuple(t for t in (1, 2, 4, 8, 16, 32, 64) if t <= cores) if device == "cpu" else (1,))
    before, models, samples = torch.get_num_threads(), {}, {}
    try:
        for t in counts:
            torch.set_num_threads(t)
            engine.add_request(synthetic_prompt(64, t), SamplingParams(max_tokens=2, ignore_eos=True))
            drain(engine)  # warm this thread count's pools
            models[t], samples[t] = _fitted(engine, quick)
    finally:
        torch.set_num_threads(before)
    block = engine.spec.block_bytes
    gbps = memcpy_gbps(64 * block, device)
    per_block_ms = block / (gbps * SEAM_SHARE_OF_MEMCPY * 1e9) * 1e3
    profile = Profile(
        model_key(ref),
        resolved,
        hardware_key(device),
        engine.spec.block_size,
        models,
        transfer_ms_per_block=per_block_ms,
        transfer_base_ms=TRANSFER_BASE_MS,
        router_hop_ms=ROUTER_HOP_MS,
        measured_at=datetime.date.today().isoformat(),
        notes={
            "transfer": f"{block} B blocks at {SEAM_SHARE_OF_MEMCPY:.0%} of memcpy ({gbps:.1f} GB/s measured)",
            "router_hop": "docs/benchmarks.md control-plane figure",
            "quick": quick,
        },
    )
    return profile, samples


def fit_error(profile: Profile, samples: dict[int, list[Sample]]) -> dict[int, tuple[float, float]]:
    """By thread count: the (mean, max) relative error of the fitted step times on the measured ones."""
    return {t: _errors(profile.steps[t], group) for t, group in samples.items()}


def load_or_measure(
    model: str | None = None, device: str = "cpu", dtype: str = "auto", quick: bool = True, say=print
) -> Profile:
    """The cached profile of `model` on this hardware, else one measured now (and cached). A cached file
    that cannot be read, or is of another model, dtype or device, is measured again and replaced."""
    ref = model_loader.resolve(model)
    resolved = precision.resolve(dtype, device).dtype
    key = (model_key(ref), resolved, hardware_key(device))
    path = cache_path(*key)
    try:
        profile = Profile.load(path)
        profile.require(*key)
        return profile
    except FileNotFoundError:
        say(f"measuring a profile of {ref.name} ({resolved}) on this machine, once; cached at {path}")
    except (OSError, ValueError, TypeError, KeyError) as e:  # ProfileMismatchError is a ValueError
        say(f"the cached profile {path} is unusable ({type(e).__name__}: {e}); measuring it again")
    profile, _ = measure(model, device, dtype, quick=quick)
    tmp = path.with_name(path.name + ".tmp")  # a crash mid-write leaves the old file or none, never half
    profile.save(tmp)
    tmp.replace(path)
    return profile
