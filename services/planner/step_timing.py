"""Real engine steps of known shapes, timed: the shape of each read from the scheduler's batch, and
decode batches brought to decoding without computing their prompts (docs/planning.md, "Profiles").
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time

import torch

from pdserve.bench.engine_bench import drain, prefill_all, synthetic_prompt
from pdserve.common.engine.engine import LLMEngine
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.scheduler import ScheduledBatch
from pdserve.planner.profile import StepShape

Sample = tuple[StepShape, float]  # a step's shape and its milliseconds


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
