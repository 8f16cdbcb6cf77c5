"""TLS, mutual TLS, API keys and the internal token, on a real in-process suite.

One suite (router, prefill, decode, KV store; real gRPC, UCX and SmolLM2)
serves the module with everything on: every server requires a client
certificate signed by the test's CA, every worker-facing call needs the
internal token, and the router needs an API key. The certificates are made
here with `cryptography`: a CA, one certificate the services share (server and
client use), one for an end user, and a rogue CA with a certificate of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import logging
import ssl

import aiohttp
import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve import client as sdk
from pdserve.common.registration import Registration
from pdserve.common.security import TLS, TOKEN_KEY, SecurityConfig, dial
from pdserve.common.server import add_health_service
from pdserve.kvstore import serve as kvstore_serve
from pdserve.kvstore.config import KVStoreConfig
from pdserve.launcher import status
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import decode_pb2_grpc, kvstore_pb2_grpc, router_pb2_grpc
from pdserve.v1 import kvstore_pb2 as kpb
from pdserve.v1 import router_pb2 as rpb
from tests.service.suite import inprocess_suite

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "sk-test-7f3c9a1e"
TOKEN = "internal-4b1d8e2a"
PROMPT = "Zebra quartz protocol seventeen: list three colors of the rainbow, briefly please."


# ---- certificates -------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path, key) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _make_ca(directory, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue(directory, name: str, ca) -> TLS:
    """A leaf certificate for 127.0.0.1/localhost, usable as server and as client."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / f"{name}.key", key)
    ca_name = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return TLS(
        ca=str(directory / f"{ca_name}.pem"), cert=str(directory / f"{name}.crt"), key=str(directory / f"{name}.key")
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = _make_ca(d, "pdserve-ca"), _make_ca(d, "rogue-ca")
    return {"service": _issue(d, "service", ca), "user": _issue(d, "user", ca), "rogue": _issue(d, "rogue", rogue_ca)}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def suite(smollm2, pki):
    svc = pki["service"]
    security = {"tls_cert": svc.cert, "tls_key": svc.key, "tls_ca": svc.ca, "internal_token": TOKEN}
    async with inprocess_suite(
        smollm2,
        "disaggregated",
        store_blocks=64,
        decode_kw={"use_store": True},
        security=security,
        router_kw={"tls_require_client_cert": True, "api_keys": [API_KEY]},
    ) as s:
        yield s


@pytest.fixture(autouse=True)
def _no_key_from_environment(monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)  # the SDK's default key


def _router(suite) -> str:
    return f"127.0.0.1:{suite.router.port}"


def _chat(max_tokens: int = 6) -> dict:
    return {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0}


# ---- the happy path: mTLS everywhere --------------------------------------------
async def test_request_streams_with_mtls_on_every_channel_and_logs_no_prompt_or_secret(suite, pki, caplog):
    caplog.set_level(logging.DEBUG, logger="pdserve")
    async with sdk.AsyncClient(_router(suite), api_key=API_KEY, tls=pki["user"], timeout=120) as client:
        chunks = [c async for c in client.generate(**_chat())]
    assert sum(len(c.token_ids) for c in chunks) > 0 and chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].route["disaggregated"]  # router -> prefill -> decode, all over mTLS
    stats = await suite.store_stats()  # the prefill worker wrote its blocks to the store over mTLS
    assert stats.blocks_written > 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (API_KEY, TOKEN, PROMPT[:20]):
        assert secret not in logged


# ---- transport: who may connect -------------------------------------------------
async def _health(target: str, tls: TLS | None) -> int:
    async with dial(target, tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


def _targets(suite) -> dict[str, str]:
    return {
        "router": _router(suite),
        "decode": f"127.0.0.1:{suite.decode[0].port}",
        "prefill": f"127.0.0.1:{suite.prefill[0].port}",
        "kvstore": f"127.0.0.1:{suite.store_port}",
    }


async def test_every_service_answers_a_client_with_a_certificate_of_the_ca(suite, pki):
    answered = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    for target in _targets(suite).values():  # health needs no token or key: probes stay simple
        assert await _health(target, pki["user"]) in answered


@pytest.mark.parametrize("who", ["plaintext", "no client certificate", "certificate of another CA"])
async def test_every_service_refuses_a_client_without_a_certificate_of_the_ca(suite, pki, who):
    ca = pki["service"].ca
    tls = {
        "plaintext": None,
        "no client certificate": TLS(ca=ca),
        "certificate of another CA": TLS(ca=ca, cert=pki["rogue"].cert, key=pki["rogue"].key),
    }[who]
    for name, target in _targets(suite).items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(target, tls)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, name


async def test_client_refuses_a_server_certificate_of_another_ca(suite, pki):
    rogue_trust = TLS(ca=pki["rogue"].ca, cert=pki["user"].cert, key=pki["user"].key)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _health(_router(suite), rogue_trust)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- the router's API keys ------------------------------------------------------
@pytest.mark.parametrize("key, message", [(None, "missing API key"), ("sk-wrong", "invalid API key")])
async def test_router_refuses_generate_without_the_right_api_key(suite, pki, key, message):
    async with sdk.AsyncClient(_router(suite), api_key=key or "", tls=pki["user"], timeout=30) as client:
        with pytest.raises(sdk.Unauthenticated) as refused:
            await client.complete(**_chat())
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and message in refused.value.details
    assert "sk-wrong" not in refused.value.details


def _https(pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["user"].ca)
    context.load_cert_chain(pki["user"].cert, pki["user"].key)
    return context


@pytest.mark.parametrize(
    "headers, status",
    [({}, 401), ({"Authorization": "Bearer sk-wrong"}, 401), ({"Authorization": f"Bearer {API_KEY}"}, 200)],
)
async def test_http_api_needs_the_api_key_and_answers_401_in_openai_shape(suite, pki, headers, status):
    url = suite.router.http.url
    assert url.startswith("https://")  # the router's certificate serves HTTP too
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/chat/completions", json=body, headers=headers, ssl=_https(pki)) as r:
            reply = await r.json()
            assert r.status == status
        async with http.get(url.removesuffix("/v1") + "/health", ssl=_https(pki)) as r:
            assert r.status == 200  # probes need no key
    if status == 401:
        assert reply["error"]["code"] == "invalid_api_key" and reply["error"]["type"] == "invalid_request_error"
    else:
        assert reply["choices"][0]["message"]["content"]


# ---- worker-facing services: certificate and internal token -----------------------
async def _call(channel_tls: TLS, target: str, method, request, token: str | None):
    metadata = ((TOKEN_KEY, token),) if token is not None else ()
    async with dial(target, channel_tls, metadata=metadata) as channel:
        return await method(channel)(request, timeout=10)


@pytest.mark.parametrize("token", [None, "not-the-token"])
async def test_kv_store_serves_no_block_to_a_caller_without_the_internal_token(suite, pki, token):
    before = await suite.store_stats()
    lookup = kpb.LookupRequest(kv_fingerprint=bytes(16), block_hashes=[bytes(16)])
    read = kpb.ReserveReadRequest(
        kv_fingerprint=bytes(16),
        block_hashes=[bytes(16)],
        ticket=pb.TransferTicket(transfer_id="stranger", secret=bytes(32), num_blocks=1),
    )
    target = _targets(suite)["kvstore"]
    for method, request in (
        (lambda ch: kvstore_pb2_grpc.KVStoreStub(ch).Lookup, lookup),
        (lambda ch: kvstore_pb2_grpc.KVStoreStub(ch).ReserveRead, read),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call(pki["service"], target, method, request, token)  # a valid cert is not enough
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "internal token" in refused.value.details()
    after = await suite.store_stats()
    assert (after.lookups, after.blocks_read, after.active_leases) == (before.lookups, before.blocks_read, 0)


async def test_workers_refuse_calls_without_the_internal_token(suite, pki):
    targets = _targets(suite)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call(
            pki["service"],
            targets["decode"],
            lambda ch: decode_pb2_grpc.DecodeStub(ch).GetLoad,
            pb.GetLoadRequest(),
            None,
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    load = await _call(
        pki["service"], targets["decode"], lambda ch: decode_pb2_grpc.DecodeStub(ch).GetLoad, pb.GetLoadRequest(), TOKEN
    )
    assert load.info.worker_id == "decode-0"


async def test_router_registers_no_worker_for_a_caller_without_the_internal_token(suite, pki):
    """An end user with a valid certificate and API key is still no worker."""
    info = pb.WorkerInfo(worker_id="rogue", role=pb.WORKER_ROLE_DECODE, address="127.0.0.1:1")
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    async with dial(_router(suite), pki["user"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await router_pb2_grpc.RouterStub(channel).RegisterWorker(
                rpb.RegisterWorkerRequest(info=info), metadata=metadata, timeout=10
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "rogue" not in {w.worker_id for w in suite.router.pool.all}


async def test_only_a_caller_with_the_internal_token_may_switch_a_worker_s_role(suite, pki):
    """An end user with a valid certificate and API key moves no worker; the operator's token
    reaches the router's own checks (decode-0 is not elastic)."""
    request = rpb.SetWorkerRoleRequest(worker_id="decode-0", role=pb.WORKER_ROLE_PREFILL)
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    async with dial(_router(suite), pki["user"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await router_pb2_grpc.RouterStub(channel).SetWorkerRole(request, metadata=metadata, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with dial(_router(suite), pki["service"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await router_pb2_grpc.RouterStub(channel).SetWorkerRole(request, metadata=((TOKEN_KEY, TOKEN),), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_operator_commands_send_the_key_and_the_token_from_the_environment(suite, pki, monkeypatch, capsys):
    """`pdserve status` lists the workers with PDSERVE_API_KEY (ListWorkers is client-facing);
    `pdserve role` reaches the router's own checks with PDSERVE_INTERNAL_TOKEN (it raised
    ValueError: a blocking channel took no per-channel metadata)."""
    svc = pki["service"]
    for name, value in (("TLS_CA", svc.ca), ("TLS_CERT", svc.cert), ("TLS_KEY", svc.key), ("INTERNAL_TOKEN", TOKEN)):
        monkeypatch.setenv(f"PDSERVE_{name}", value)
    monkeypatch.setenv("PDSERVE_API_KEY", "not-a-key")  # refused: said so, not "does not answer"
    assert await asyncio.to_thread(status.run_status, argparse.Namespace(target=_router(suite), json=False)) == 1
    assert "does not answer: UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("PDSERVE_API_KEY", API_KEY)
    workers = await asyncio.to_thread(status.list_workers, _router(suite), 10.0)
    assert workers and "decode-0" in {w.info.worker_id for w in workers}
    args = argparse.Namespace(target=_router(suite), worker="decode-0", role="prefill", drain_timeout=1.0)
    assert await asyncio.to_thread(status.run_role, args) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err  # decode-0 is not elastic: the router said so


async def test_a_worker_with_the_token_and_a_certificate_registers_and_leaves(suite, pki):
    svc = pki["service"]
    worker = SecurityConfig(tls_cert=svc.cert, tls_key=svc.key, tls_ca=svc.ca, internal_token=TOKEN)
    info = pb.WorkerInfo(worker_id="joiner", role=pb.WORKER_ROLE_DECODE, address="127.0.0.1:1")
    registration = Registration(
        [_router(suite)], lambda: pb.GetLoadResponse(info=info, load=pb.WorkerLoad()), security=worker
    )
    registered = lambda: "joiner" in {w.worker_id for w in suite.router.pool.all}  # noqa: E731
    registration.start()
    try:
        for _ in range(100):
            if registered():
                break
            await asyncio.sleep(0.1)
        assert registered()
    finally:
        await registration.stop()  # deregisters at once
    assert not registered()


async def test_internal_token_alone_keeps_strangers_off_a_plaintext_kv_store():
    """TLS off (a trusted network): the token still decides who is a worker."""
    config = KVStoreConfig(port=0, capacity_blocks=4, transport="loopback", internal_token=TOKEN)
    server, port, service = kvstore_serve.build(config, block_bytes=64)
    await add_health_service(server)
    await server.start()
    target, lookup = f"127.0.0.1:{port}", kpb.LookupRequest(kv_fingerprint=bytes(16), block_hashes=[bytes(16)])
    try:
        async with dial(target) as stranger:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await kvstore_pb2_grpc.KVStoreStub(stranger).Lookup(lookup, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await health_pb2_grpc.HealthStub(stranger).Check(health_pb2.HealthCheckRequest(), timeout=10)
        async with SecurityConfig(internal_token=TOKEN).dial(target) as worker:
            assert (await kvstore_pb2_grpc.KVStoreStub(worker).Lookup(lookup, timeout=10)).num_cached_blocks == 0
        assert service.store.stats.lookups == 1  # the refused call never reached the store
    finally:
        await server.stop(grace=0)
        await service.aclose()
