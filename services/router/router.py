"""The router's request flow: tokenize, plan, relay tokens, own the text.

Workers deal only in token ids; the router detokenizes once and matches stop
strings, cancelling the downstream stream when one appears. Whatever ends a
request (finish, stop string, client cancel, error), every downstream call
is cancelled and every decode reservation released before generate() returns.
"""
from __future__ import annotations

import collections
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from pdserve.common import convert
from pdserve.common.engine.detokenizer import IncrementalDetokenizer
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.engine.sequence import FinishReason
from pdserve.common.errors import CapacityExhaustedError, InvalidRequestError, NotReadyError
from pdserve.common.kv.hashing import block_hashes
from pdserve.common.server import error_from_rpc
from pdserve.router import policy
from pdserve.router.worker_pool import Worker, WorkerPool
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import prefill_pb2 as ppb


@dataclass
class GenerateInput:
    params: SamplingParams
    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    request_id: str = ""


@dataclass
class Event:
    """One step of the client stream; the last one has finish_reason set."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    usage: tuple[int, int, int] | None = None  # prompt, completion, cached
    timing: dict[str, float] = field(default_factory=dict)
    route: tuple[str, str, bool] | None = None  # prefill id, decode id, disaggregated


@dataclass
class Plan:
    decode: policy.Choice
    prefill: policy.Choice | None  # None: the decode worker prefills locally
    hashes: list[bytes]


class Router:
    def __init__(self, tokenizer, pool: WorkerPool, *, mode: str, max_model_len: int,
                 max_inflight: int = 256, rpc_timeout_s: float = 600.0, local_prefill: str = "auto"):
        self.tokenizer, self.pool, self.mode = tokenizer, pool, mode
        self.max_model_len, self.max_inflight, self.rpc_timeout_s = max_model_len, max_inflight, rpc_timeout_s
        self.local_prefill = local_prefill  # auto (cost model), always, never
        self.vocab_size = len(tokenizer)
        self.inflight = 0
        self.index = policy.PrefixIndex()
        self.hop_ms = 0.0  # measured extra latency of the disaggregated path
        self.decisions: collections.Counter[str] = collections.Counter()

    def tokenize(self, inp: GenerateInput) -> list[int]:
        if inp.token_ids is not None:
            ids = convert.token_ids(inp.token_ids, "prompt.token_ids", self.vocab_size)
        elif inp.messages is not None:
            if not inp.messages:
                raise InvalidRequestError("prompt.chat", "must have at least one message")
            ids = list(self.tokenizer.apply_chat_template(
                inp.messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        elif inp.text:
            ids = self.tokenizer.encode(inp.text, add_special_tokens=False)
        else:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"{len(ids)} tokens; the context window is {self.max_model_len}")
        return ids

    def plan(self, ids: list[int]) -> Plan:
        decoders = [w for w in self.pool.decode if w.healthy]
        if not decoders:
            raise NotReadyError("no healthy decode worker")
        spec = decoders[0].info.kv_spec
        hashes = block_hashes(spec.fingerprint, ids, spec.block_size)
        decode = policy.cheapest(decoders, self.index, hashes, len(ids), spec.block_size)
        if self.mode == "colocated" or self.local_prefill == "always":
            return Plan(decode, None, hashes)
        prefillers = [w for w in self.pool.prefill if w.healthy]
        if not prefillers:
            raise NotReadyError("no healthy prefill worker")
        prefill = policy.cheapest(prefillers, self.index, hashes, len(ids), spec.block_size)
        if self.local_prefill == "auto":
            hop = self.hop_ms or 1.5 * (decode.worker.rtt_ms + prefill.worker.rtt_ms)
            uncached = len(ids) - decode.cached_blocks * spec.block_size
            if policy.prefer_local(policy.local_prefill_cost_ms(decode, uncached),
                                   policy.remote_prefill_cost_ms(prefill, hop)):
                return Plan(decode, None, hashes)
        return Plan(decode, prefill, hashes)

    async def generate(self, inp: GenerateInput) -> AsyncIterator[Event]:
        t0 = time.perf_counter()
        ids = self.tokenize(inp)
        if self.inflight >= self.max_inflight:
            raise CapacityExhaustedError(f"router at capacity ({self.max_inflight} requests in flight)")
        rid = inp.request_id or uuid.uuid4().hex
        self.inflight += 1
        try:
            plan = self.plan(ids)
            self.decisions["disaggregated" if plan.prefill else "local_prefill"] += 1
            async for ev in self._run(rid, ids, inp.params, plan, t0):
                yield ev
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None
        finally:
            self.inflight -= 1

    async def _run(self, rid: str, ids: list[int], params: SamplingParams, plan: Plan, t0: float) -> AsyncIterator[Event]:
        worker_params = convert.sampling_to_pb(dataclasses.replace(params, stop=()))
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        decode, prefill = plan.decode.worker, plan.prefill.worker if plan.prefill else None
        first_worker = prefill or decode
        uncached = len(ids) - (plan.prefill or plan.decode).cached_blocks * decode.info.kv_spec.block_size
        timing: dict[str, float] = {}
        reserved = False
        stream = None
        completion = cached = 0
        t_first = None
        decode.inflight += 1
        first_worker.inflight_tokens += uncached
        try:
            if prefill is None:
                stream = decode.stub.Generate(dpb.LocalGenerateRequest(
                    request_id=rid, prompt_token_ids=ids, sampling=worker_params), timeout=self.rpc_timeout_s)
            else:
                prefill.inflight += 1
                try:
                    r = await decode.stub.Reserve(dpb.ReserveRequest(
                        request_id=rid, prompt_token_ids=ids, kv_fingerprint=prefill.fingerprint),
                        timeout=self.rpc_timeout_s)
                    reserved = True
                    p = await prefill.stub.Prefill(ppb.PrefillRequest(
                        request_id=rid, prompt_token_ids=ids, sampling=worker_params, ticket=r.ticket),
                        timeout=self.rpc_timeout_s)
                finally:
                    prefill.inflight -= 1
                    first_worker.inflight_tokens -= uncached
                    uncached = 0
                t_first = time.perf_counter()
                ttft = (t_first - t0) * 1e3
                hop = max(0.0, ttft - p.timing.prefill_ms)
                self.hop_ms = 0.8 * self.hop_ms + 0.2 * hop if self.hop_ms else hop
                timing.update(queued_ms=p.timing.queued_ms, prefill_ms=p.timing.prefill_ms, ttft_ms=ttft)
                self.index.record(prefill.worker_id, plan.hashes)
                cached = max(r.num_cached_tokens, p.num_cached_tokens)
                completion = 1
                ev = self._event(rid, [p.first_token_id], detok)
                reason = convert.finish_from_pb(p.finish_reason) or (FinishReason.STOP if detok.stopped else None)
                yield ev
                if reason is not None:
                    yield self._final(rid, detok, reason, ids, completion, cached, timing, t0, t_first, plan)
                    return
                stream = decode.stub.Decode(dpb.DecodeRequest(
                    request_id=rid, first_token_id=p.first_token_id, sampling=worker_params), timeout=self.rpc_timeout_s)
                reserved = False  # the Decode stream owns the reservation now
            self.index.record(decode.worker_id, plan.hashes)
            async for resp in stream:
                if t_first is None:
                    t_first = time.perf_counter()
                    timing["ttft_ms"] = (t_first - t0) * 1e3
                    first_worker.inflight_tokens -= uncached
                    uncached = 0
                if resp.timing.kv_transfer_ms:
                    timing["kv_transfer_ms"] = resp.timing.kv_transfer_ms
                completion += len(resp.token_ids)
                if resp.usage.prompt_tokens:
                    cached = max(cached, resp.usage.cached_tokens)
                ev = self._event(rid, list(resp.token_ids), detok)
                reason = FinishReason.STOP if detok.stopped else convert.finish_from_pb(resp.finish_reason)
                yield ev
                if reason is not None:
                    yield self._final(rid, detok, reason, ids, completion, cached, timing, t0, t_first, plan)
                    return
            raise NotReadyError(f"decode worker {decode.worker_id} ended the stream without finishing")
        finally:
            decode.inflight -= 1
            first_worker.inflight_tokens -= uncached
            if stream is not None:
                stream.cancel()  # no-op once finished; else cancels downstream
            if reserved:
                try:
                    await decode.stub.Release(dpb.ReleaseRequest(request_id=rid), timeout=5)
                except grpc.aio.AioRpcError:
                    pass  # the lease expires on its own

    def _event(self, rid: str, tokens: list[int], detok: IncrementalDetokenizer) -> Event:
        for t in tokens:
            if not detok.stopped:
                detok.add(t)
        return Event(rid, tokens, detok.flush(final=detok.stopped))

    def _final(self, rid, detok, reason, ids, completion, cached, timing, t0, t_first, plan: Plan) -> Event:
        now = time.perf_counter()
        timing = {**timing, "decode_ms": (now - (t_first or now)) * 1e3, "total_ms": (now - t0) * 1e3}
        route = (plan.prefill.worker.worker_id if plan.prefill else "", plan.decode.worker.worker_id, plan.prefill is not None)
        return Event(rid, [], detok.flush(final=True), reason, (len(ids), completion, cached), timing, route)
