"""How the load generator sends one request and times its stream.

Each sender asks for exactly max_tokens greedy tokens (ignore_eos) and fills a RequestRecord: `StubSender`
(raw Router stub), `SdkSender` (client SDK), `DirectSender` (a worker's Decode.Generate), `HttpSender`
(streamed /v1/completions). What each measures: docs/benchmarks.md ("Load generator", "Control plane").
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import grpc

from pdserve.bench.metrics import RequestRecord
from pdserve.bench.workload import Request
from pdserve.client import AsyncClient, PdserveClientError
from pdserve.common.auth import bearer
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2 as dpb
from pdserve.v1 import decode_pb2_grpc, router_pb2_grpc
from pdserve.v1 import router_pb2 as rpb

Clock = Callable[[], float]
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20)]


def _api_key(api_key: str | None) -> str | None:
    return os.environ.get("PDSERVE_API_KEY") if api_key is None else api_key  # as the SDK


async def _record(stream, rec: RequestRecord, now: Clock) -> None:
    """Time each message of a gRPC stream that carries tokens; a failed call is the record's error."""
    try:
        async for r in stream:
            if r.token_ids:
                rec.tokens(now(), len(r.token_ids), r.token_ids)
    except grpc.aio.AioRpcError as e:
        rec.error = e.code().name


class StubSender:
    def __init__(self, target: str, timeout_s: float = 600.0, api_key: str | None = None):
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.timeout_s = timeout_s
        key = _api_key(api_key)
        self.metadata = bearer(key) or None

    async def __call__(self, req: Request, rec: RequestRecord, now: Clock) -> None:
        msg = rpb.GenerateRequest(
            token_ids=pb.TokenIds(ids=req.prompt),
            sampling=pb.SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True),
        )
        await _record(self.stub.Generate(msg, timeout=self.timeout_s, metadata=self.metadata), rec, now)

    async def close(self) -> None:
        await self.channel.close()


class SdkSender:
    def __init__(self, target: str, timeout_s: float = 600.0, api_key: str | None = None):
        self.client = AsyncClient(target, timeout=timeout_s, api_key=api_key)

    async def __call__(self, req: Request, rec: RequestRecord, now: Clock) -> None:
        try:
            async with self.client.generate(
                req.prompt, max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True
            ) as stream:
                async for chunk in stream:
                    if chunk.token_ids:
                        rec.tokens(now(), len(chunk.token_ids), chunk.token_ids)
        except PdserveClientError as e:
            rec.error = e.code.name if e.code else type(e).__name__

    async def close(self) -> None:
        await self.client.close()


class HttpSender:
    def __init__(
        self,
        url: str,
        timeout_s: float = 600.0,
        api_key: str | None = None,
        model: str | None = None,
        ignore_eos: bool = True,
    ):
        import aiohttp  # only the HTTP path needs it

        base = url.rstrip("/")
        self.url = (base if base.endswith("/v1") else base + "/v1") + "/completions"
        key = _api_key(api_key)
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {key}"} if key else None,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_s),
            connector=aiohttp.TCPConnector(limit=0),
        )  # no pool cap: open loop
        self.errors = (aiohttp.ClientError, OSError, TimeoutError, ValueError)
        self.model = model  # other servers than pdserve may require the name they serve
        self.ignore_eos = ignore_eos  # a server without the field may stop early: the usage chunk counts its tokens

    async def __call__(self, req: Request, rec: RequestRecord, now: Clock) -> None:
        body = {
            "prompt": req.prompt,
            "max_tokens": req.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.model:
            body["model"] = self.model
        try:
            async with self.session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    rec.error = f"HTTP_{resp.status}"
                    return
                usage = None
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        rec.error = "STREAM_ERROR"
                    elif obj.get("choices") and obj["choices"][0].get("text"):
                        rec.tokens(now(), 1)
                    usage = obj.get("usage") or usage
                if usage:
                    rec.output_tokens = usage["completion_tokens"]
                    rec.prompt_tokens = usage.get("prompt_tokens") or rec.prompt_tokens  # a text prompt's tokens
        except self.errors as e:  # connection failures, timeouts, a malformed chunk
            rec.error = type(e).__name__

    async def close(self) -> None:
        await self.session.close()


class DirectSender:
    """The same request without the router: Decode.Generate on the worker itself."""

    def __init__(self, target: str, timeout_s: float = 600.0):
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = decode_pb2_grpc.DecodeStub(self.channel)
        self.timeout_s = timeout_s

    async def __call__(self, req: Request, rec: RequestRecord, now: Clock) -> None:
        msg = dpb.LocalGenerateRequest(
            request_id=f"direct-{req.index}",
            prompt_token_ids=req.prompt,
            sampling=pb.SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True),
        )
        await _record(self.stub.Generate(msg, timeout=self.timeout_s), rec, now)

    async def close(self) -> None:
        await self.channel.close()


def make(
    target: str | None, http: str | None, client: str = "stub", timeout_s: float = 600.0, api_key: str | None = None
):
    """The sender the command line asks for: HTTP when `http` is a URL, else gRPC."""
    if http:
        return HttpSender(http, timeout_s, api_key)
    return (SdkSender if client == "sdk" else StubSender)(target, timeout_s, api_key)
