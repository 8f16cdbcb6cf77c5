"""The engine API the services call: add, step, stream, abort, KV export/import.

`step()` is the whole loop: schedule -> run the model -> sample -> update sequences -> emit outputs.
State flows one way through it; nothing else mutates sequences except `abort`, which finishes one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import torch

from pdserve.common import model_loader
from pdserve.common.engine import attention, precision, quantize
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.detokenizer import IncrementalDetokenizer
from pdserve.common.engine.kv_layout import kv_layout
from pdserve.common.engine.model_runner import ModelRunner
from pdserve.common.engine.outputs import EngineStats, RequestOutput
from pdserve.common.engine.request import Request, check_prompt, finish_reason
from pdserve.common.engine.sampler import sample, seeded
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.common.engine.sequence import FinishReason, Sequence
from pdserve.common.errors import CapacityExhaustedError, InvalidRequestError, NotFoundError
from pdserve.common.kv.block_manager import BlockManager
from pdserve.common.kv.pool import KVPool


class LLMEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None, ref: model_loader.ModelRef | None = None):
        """Loads the model from config.model unless (model, tokenizer, ref) are given."""
        impl = attention.register()
        loaded = None if model is None else str(model.dtype).removeprefix("torch.")
        self.precision = precision.resolve(config.dtype, config.device, loaded)
        if model is None:
            ref = model_loader.resolve(config.model)
            model, tokenizer = model_loader.load(ref, impl, config.device, self.precision.dtype)
        else:
            if loaded != self.precision.dtype:
                raise ValueError(f"the given model is in {loaded}, not in dtype {self.precision.dtype}")
            model.set_attn_implementation(impl)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.ref = ref
        self.weight_bytes = (  # what a decode step reads, before packing
            quantize.weight_bytes(model)
            if config.quantization == "int8"
            else sum(p.numel() * p.element_size() for p in model.parameters())
        )
        # window: the context the model and the pool allow; max_model_len, less quarantined blocks (they bound
        # it as the pool does: a sequence grown past them, preempted, would wait for ever).
        self.spec, num_blocks, self.window = kv_layout(config, model.config, ref, self.precision.dtype)
        self.pool = KVPool(self.spec, num_blocks, config.device)
        self.blocks = BlockManager(num_blocks, config.block_size, self.spec.fingerprint, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill),
            self.blocks,
        )
        self.runner = ModelRunner(model, self.pool, config)
        self.eos_token_ids = self._eos_ids()
        self._requests: dict[str, Request] = {}  # in the scheduler
        self._reserved: dict[str, Request] = {}  # blocks reserved, KV arriving from a prefill worker
        self._held: dict[str, Sequence] = {}  # finished, blocks kept until release()
        self._ids = itertools.count()
        self.computed_tokens = 0

    def describe(self) -> str:
        """What this engine runs with, for the start-up line."""
        return f"{self.precision}, {torch.get_num_threads()} torch threads, {self.runner.describe()}"

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return {e for e in [*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id] if e is not None}

    # -- requests ---------------------------------------------------------
    def _new_request(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None, hold_blocks: bool
    ) -> Request:
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        if any(request_id in held for held in (self._requests, self._reserved, self._held, self.blocks.quarantined)):
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)  # a BOS where it adds one
        if self.blocks.num_quarantined and self.max_model_len <= len(ids) < self.window:  # another worker can take it
            raise CapacityExhaustedError(f"{len(ids)} tokens; quarantined KV blocks leave {self.max_model_len}")
        check_prompt(
            ids, self.max_model_len, self.model.config.vocab_size, self.blocks.num_blocks, self.config.block_size
        )
        seq = Sequence(request_id, ids, params, self.config.block_size)
        return Request(
            seq, IncrementalDetokenizer.of(self.tokenizer, ids, params), self._generator(params), hold_blocks
        )

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        return None if params.seed is None else torch.Generator(device=self.config.device)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        hold_blocks: bool = False,
    ) -> str:
        """Queue a request. `hold_blocks`: keep its KV blocks when it finishes
        (or is aborted) until `release()`, e.g. while a prefill worker sends them."""
        req = self._new_request(prompt, params, request_id, hold_blocks)
        self._requests[req.seq.request_id] = req
        self.scheduler.add(req.seq)
        return req.seq.request_id

    # -- disaggregation: KV computed elsewhere ---------------------------------
    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams | None = None) -> Sequence:
        """Reserve blocks for a prompt whose KV another worker computes.

        Returns the sequence: its block_table is where the KV must land; the
        first num_cached_tokens of it are already here (prefix cache) and need
        not be sent. The blocks stay reserved until admit() or release().
        """
        req = self._new_request(prompt, params, request_id, hold_blocks=False)
        self.blocks.allocate(req.seq)  # raises CapacityExhaustedError when full
        self._reserved[request_id] = req
        return req.seq

    def admit(self, request_id: str, first_token: int, params: SamplingParams | None = None) -> None:
        """The reserved prompt's KV has landed and was verified; the prefill
        worker sampled `first_token`. Join the running batch to decode the rest."""
        self.resume(request_id, self._reserved_seq(request_id).num_prompt_tokens, params, first_token)

    def resume(
        self,
        request_id: str,
        computed_tokens: int,
        params: SamplingParams | None = None,
        first_token: int | None = None,
        hold_blocks: bool = False,
    ) -> None:
        """Schedule a reservation whose first `computed_tokens` tokens of KV are
        now in its blocks (imported from a peer or the KV store); the engine
        computes the rest, then samples as usual."""
        seq = self._reserved_seq(request_id)
        if not seq.num_cached_tokens <= computed_tokens <= seq.num_prompt_tokens:
            bounds = f"[{seq.num_cached_tokens}, {seq.num_prompt_tokens}]"
            raise InvalidRequestError("computed_tokens", f"{computed_tokens} outside {bounds}")
        req = self._reserved.pop(request_id)
        req.hold_blocks = hold_blocks
        if params is not None:
            seq.params = params
            req.detok = IncrementalDetokenizer.of(self.tokenizer, seq.prompt_token_ids, params)
            req.generator = self._generator(params)
        seq.num_computed_tokens = computed_tokens
        self.blocks.commit_computed(seq)  # imported blocks become reusable prefix cache
        if first_token is not None:
            seq.output_token_ids.append(first_token)
            req.detok.add(first_token)
            req.detok.flush(final=False)  # the first token's text went out with the prefill's answer
        self._requests[request_id] = req
        self.scheduler.add(seq)

    def _reserved_seq(self, request_id: str) -> Sequence:
        req = self._reserved.get(request_id)
        if req is None:
            raise NotFoundError(f"no reservation {request_id!r}")
        return req.seq

    def kv_blocks(self, request_id: str) -> tuple[int, list[int]]:
        """(tokens whose KV is computed, block table) of a request, to export its KV."""
        req = self._requests.get(request_id) or self._reserved.get(request_id)
        seq = req.seq if req else self._held.get(request_id)
        if seq is None:
            raise NotFoundError(f"request {request_id!r} holds no blocks")
        return seq.num_computed_tokens, list(seq.block_table)

    def export_kv(self, request_id: str) -> list[memoryview]:
        """Bytes-like views of the blocks holding a request's computed KV (no copy)."""
        computed, table = self.kv_blocks(request_id)
        return self.pool.export_blocks(table[: (computed + self.config.block_size - 1) // self.config.block_size])

    def import_kv(self, request_id: str, buffers: list, first_block: int = 0) -> None:
        """Copy KV blocks into a reservation, from block `first_block` on."""
        table = self._reserved_seq(request_id).block_table
        if first_block + len(buffers) > len(table):
            raise InvalidRequestError("buffers", f"{first_block + len(buffers)} blocks for {len(table)} reserved")
        self.pool.import_blocks(table[first_block : first_block + len(buffers)], buffers)

    def release(self, request_id: str) -> bool:
        """Free the blocks of a reservation or of a finished, held request."""
        req = self._reserved.pop(request_id, None)
        seq = req.seq if req else self._held.pop(request_id, None)
        if seq is None:
            return False
        self.blocks.free(seq)
        return True

    def quarantine(self, request_id: str) -> None:
        """Drop a reservation whose transfer could not be fenced (data might still land): it stops
        counting as one, and the blocks a transfer may write stay out of use until reclaim()."""
        self.blocks.quarantine(self._reserved.pop(request_id).seq)

    def reclaim(self, request_id: str) -> int:
        """A quarantine's blocks back in use: the transfer into them is fenced after all."""
        return self.blocks.reclaim(request_id)

    @property
    def max_model_len(self) -> int:
        return min(self.window, max(2, self.blocks.usable_tokens))

    def abort(self, request_id: str) -> None:
        if request_id in self._reserved:
            self.release(request_id)
            return
        req = self._requests.pop(request_id, None)
        if req is None:
            raise NotFoundError(f"request {request_id!r} is not running")
        self._finish(req, FinishReason.ABORT)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self.scheduler.finish(req.seq, reason, free_blocks=not req.hold_blocks)
        if req.hold_blocks:
            self._held[req.seq.request_id] = req.seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        seqs, logits = self.runner.run(batch)
        self.computed_tokens += batch.num_tokens
        tokens: list[int] = []
        if seqs:
            gens = [seeded(self._requests[s.request_id].generator, s.params, len(s.output_token_ids)) for s in seqs]
            tokens = sample(logits, [s.params for s in seqs], gens)
        self.scheduler.postprocess(batch, dict(zip(seqs, tokens)))
        return [self._emit(seq, tok) for seq, tok in zip(seqs, tokens)]

    def _emit(self, seq: Sequence, token: int) -> RequestOutput:
        req = self._requests[seq.request_id]
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        req.detok.add(token)
        reason = finish_reason(seq, token, req.detok.stopped, self.eos_token_ids, self.max_model_len)
        if reason is not None:
            self._finish(req, reason)
            del self._requests[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            text=req.detok.flush(final=reason is not None),
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=len(seq.output_token_ids),
            queued_s=(seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time,
        )

    # -- conveniences ---------------------------------------------------------
    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Run the engine until one request finishes, yielding its outputs."""
        rid = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            if rid in self._requests:
                self.abort(rid)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[list[int]]:
        """Run prompts to completion together; output token ids per prompt."""
        rids = [self.add_request(p, params) for p in prompts]
        outs: dict[str, list[int]] = {r: [] for r in rids}
        while self.has_unfinished():
            for o in self.step():
                outs[o.request_id].extend(o.new_token_ids)
        return [outs[r] for r in rids]

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            reserved=len(self._reserved),
            held=len(self._held),
            free_blocks=self.blocks.num_free_blocks,
            total_blocks=self.blocks.num_blocks,
            prefix_queries=self.blocks.prefix_queries,
            prefix_hits=self.blocks.prefix_hits,
            computed_tokens=self.computed_tokens,
            preemptions=self.scheduler.num_preemptions,
            quarantined_blocks=self.blocks.num_quarantined,
        )
