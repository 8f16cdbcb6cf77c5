"""The router's request flow: tokenize, pick workers, relay tokens, own text.

Workers deal only in token ids; the router detokenizes once and matches stop
strings, cancelling the downstream stream when one appears. Whatever ends a
request (finish, stop string, client cancel, error), every downstream call
is cancelled and every decode reservation released before generate() returns.
"""
from __future__ import annotations

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
from pdserve.common.server import error_from_rpc
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


class Router:
    def __init__(self, tokenizer, pool: WorkerPool, *, mode: str, max_model_len: int,
                 max_inflight: int = 256, rpc_timeout_s: float = 600.0):
        self.tokenizer, self.pool, self.mode = tokenizer, pool, mode
        self.max_model_len, self.max_inflight, self.rpc_timeout_s = max_model_len, max_inflight, rpc_timeout_s
        self.vocab_size = len(tokenizer)
        self.inflight = 0

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

    async def generate(self, inp: GenerateInput) -> AsyncIterator[Event]:
        t0 = time.perf_counter()
        ids = self.tokenize(inp)
        if self.inflight >= self.max_inflight:
            raise CapacityExhaustedError(f"router at capacity ({self.max_inflight} requests in flight)")
        rid = inp.request_id or uuid.uuid4().hex
        self.inflight += 1
        try:
            async for ev in self._run(rid, ids, inp.params, t0):
                yield ev
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None
        finally:
            self.inflight -= 1

    async def _run(self, rid: str, ids: list[int], params: SamplingParams, t0: float) -> AsyncIterator[Event]:
        worker_params = convert.sampling_to_pb(dataclasses.replace(params, stop=()))
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        timing: dict[str, float] = {}
        decode = WorkerPool.pick(self.pool.decode, "decode")
        prefill: Worker | None = None
        reserved = False
        stream = None
        completion = cached = 0
        t_first = None
        decode.inflight += 1
        try:
            if self.mode == "colocated":
                stream = decode.stub.Generate(dpb.LocalGenerateRequest(
                    request_id=rid, prompt_token_ids=ids, sampling=worker_params), timeout=self.rpc_timeout_s)
            else:
                prefill = WorkerPool.pick(self.pool.prefill, "prefill")
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
                t_first = time.perf_counter()
                timing.update(queued_ms=p.timing.queued_ms, prefill_ms=p.timing.prefill_ms,
                              ttft_ms=(t_first - t0) * 1e3)
                cached = max(r.num_cached_tokens, p.num_cached_tokens)
                completion = 1
                ev = self._event(rid, [p.first_token_id], detok)
                reason = convert.finish_from_pb(p.finish_reason) or (FinishReason.STOP if detok.stopped else None)
                if reason is not None:
                    yield ev
                    yield self._final(rid, detok, reason, ids, completion, cached, timing, t0, t_first, decode, prefill)
                    return
                yield ev
                stream = decode.stub.Decode(dpb.DecodeRequest(
                    request_id=rid, first_token_id=p.first_token_id, sampling=worker_params), timeout=self.rpc_timeout_s)
                reserved = False  # the Decode stream owns the reservation now
            async for resp in stream:
                if t_first is None:
                    t_first = time.perf_counter()
                    timing["ttft_ms"] = (t_first - t0) * 1e3
                if resp.timing.kv_transfer_ms:
                    timing["kv_transfer_ms"] = resp.timing.kv_transfer_ms
                completion += len(resp.token_ids)
                if resp.usage.prompt_tokens:
                    cached = max(cached, resp.usage.cached_tokens)
                ev = self._event(rid, list(resp.token_ids), detok)
                reason = FinishReason.STOP if detok.stopped else convert.finish_from_pb(resp.finish_reason)
                yield ev
                if reason is not None:
                    yield self._final(rid, detok, reason, ids, completion, cached, timing, t0, t_first, decode, prefill)
                    return
            raise NotReadyError(f"decode worker {decode.worker_id} ended the stream without finishing")
        finally:
            decode.inflight -= 1
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

    def _final(self, rid, detok, reason, ids, completion, cached, timing, t0, t_first, decode, prefill) -> Event:
        now = time.perf_counter()
        timing = {**timing, "decode_ms": (now - (t_first or now)) * 1e3, "total_ms": (now - t0) * 1e3}
        route = (prefill.worker_id if prefill else "", decode.worker_id, prefill is not None)
        return Event(rid, [], detok.flush(final=True), reason, (len(ids), completion, cached), timing, route)
