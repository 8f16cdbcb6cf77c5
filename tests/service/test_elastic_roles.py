"""Elastic workers change role under load (issue #18 item 5): the router stops sending the
work of the role a worker leaves, the worker finishes it, and the router routes the new
role's work to it. No request fails, greedy streams match an unswitched run token for
token, and no KV block is left. Real gRPC servers, UCX and SmolLM2 in float32."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest

from pdserve.client import AsyncClient
from pdserve.v1 import common_pb2 as pb
from pdserve.v1 import prefill_pb2 as ppb
from pdserve.v1 import prefill_pb2_grpc
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import text_of_tokens
from tests.polling import settles
from tests.service.suite import inprocess_suite, pools_full

ROLE = {"prefill": pb.WORKER_ROLE_PREFILL, "decode": pb.WORKER_ROLE_DECODE, "both": pb.WORKER_ROLE_BOTH}


async def _run(client, prompts, tag: str) -> list[tuple[float, float, list[int]]]:
    """Each prompt's (start, end, greedy tokens), all sent at once, staggered a little."""

    async def one(i: int, ids: list[int]):
        await asyncio.sleep(0.15 * i)
        t0 = time.monotonic()
        c = await client.complete(ids, max_tokens=16, temperature=0.0, ignore_eos=True, request_id=f"{tag}-{i}")
        return t0, time.monotonic(), c.token_ids

    return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))


async def _listed(suite) -> dict[str, rpb.WorkerStatus]:
    return {w.info.worker_id: w for w in (await suite.stub.ListWorkers(rpb.ListWorkersRequest())).workers}


async def _switch(suite, worker_id: str, role: str) -> rpb.SetWorkerRoleResponse:
    return await suite.stub.SetWorkerRole(rpb.SetWorkerRoleRequest(worker_id=worker_id, role=ROLE[role]))


async def test_roles_switch_under_load_without_a_failed_request_or_a_changed_token(smollm2):
    _, _, tokenizer = smollm2
    prompts = [text_of_tokens(tokenizer, 40 + 37 * i, offset=11 * i) for i in range(10)]
    async with inprocess_suite(smollm2, prefill_workers=0, decode_workers=0, elastic=("prefill", "decode")) as suite:
        async with AsyncClient(f"127.0.0.1:{suite.router.port}", timeout=300) as client:
            reference = [tokens for _, _, tokens in await _run(client, prompts, "reference")]
            run = asyncio.create_task(_run(client, prompts, "switched"))
            assert await settles(lambda: suite.router.router.inflight >= 3, timeout=60)
            t_switch = time.monotonic()
            # 1P+1D -> 0P+2D (every prompt prefilled locally) -> 1D+1P the other way -> 1D + 1 both.
            moves = [
                await _switch(suite, "elastic-0", "decode"),
                await _switch(suite, "elastic-1", "prefill"),
                await _switch(suite, "elastic-1", "both"),
            ]
            switched = await run  # raises if any request failed
            after = [await client.complete(ids, max_tokens=4, temperature=0.0, ignore_eos=True) for ids in prompts[:4]]
        listed = await _listed(suite)
        await pools_full(suite)  # nothing reserved, held or running on either worker: no block leaked
    assert [tokens for _, _, tokens in switched] == reference
    assert any(start < t_switch < end for start, end, _ in switched)  # the switches happened under load
    assert [(m.previous_role, m.role) for m in moves] == [
        (ROLE["prefill"], ROLE["decode"]),
        (ROLE["decode"], ROLE["prefill"]),
        (ROLE["prefill"], ROLE["both"]),
    ]
    assert all(m.drained for m in moves)
    assert listed["elastic-0"].info.role == ROLE["decode"] and listed["elastic-1"].info.role == ROLE["both"]
    assert listed["elastic-0"].info.elastic and listed["elastic-1"].info.elastic
    # elastic-0 only decodes now; elastic-1 prefills for it, or for itself (locally)
    assert all(c.route["prefill_worker_id"] in ("", "elastic-1") for c in after)
    assert {c.route["decode_worker_id"] for c in after} <= {"elastic-0", "elastic-1"}


async def test_a_role_switch_that_cannot_be_made_is_refused_and_changes_nothing(smollm2):
    async with inprocess_suite(smollm2, prefill_workers=0, decode_workers=1, elastic=("decode",)) as suite:
        bad = {
            "decode-0 is not elastic": (
                rpb.SetWorkerRoleRequest(worker_id="decode-0", role=ROLE["prefill"]),
                grpc.StatusCode.FAILED_PRECONDITION,
                "not elastic",
            ),
            "colocated is no elastic role": (
                rpb.SetWorkerRoleRequest(worker_id="elastic-0", role=pb.WORKER_ROLE_COLOCATED),
                grpc.StatusCode.INVALID_ARGUMENT,
                "role",
            ),
            "unknown worker": (
                rpb.SetWorkerRoleRequest(worker_id="nobody", role=ROLE["both"]),
                grpc.StatusCode.NOT_FOUND,
                "nobody",
            ),
            "no worker named": (
                rpb.SetWorkerRoleRequest(role=ROLE["both"]),
                grpc.StatusCode.INVALID_ARGUMENT,
                "worker_id",
            ),
        }
        for why, (request, code, named) in bad.items():
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await suite.stub.SetWorkerRole(request)
            assert e.value.code() == code and named in e.value.details(), why
        # A decode-only elastic worker takes no prefill, even when called directly.
        elastic = next(rt for rt in suite.decode if rt.worker_id == "elastic-0")
        stub = prefill_pb2_grpc.PrefillStub(suite.security.dial(f"127.0.0.1:{elastic.port}"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Prefill(
                ppb.PrefillRequest(
                    request_id="direct", prompt_token_ids=[1, 2, 3], sampling=pb.SamplingParams(max_tokens=1)
                )
            )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "takes no new prefill" in e.value.details()
        listed = await _listed(suite)
        await pools_full(suite)
    assert listed["elastic-0"].info.role == ROLE["decode"] and not listed["decode-0"].info.elastic


async def test_a_worker_draining_for_a_switch_stays_one_worker_of_the_router(smollm2):
    # Between prefill and decode it is in neither routing group: it must still be polled, known to
    # its own registration and heartbeats, and not become a second worker of the same address.
    _, _, tokenizer = smollm2
    async with inprocess_suite(smollm2, prefill_workers=0, decode_workers=1, elastic=("decode",)) as suite:
        pool = suite.router.router.pool
        async with AsyncClient(f"127.0.0.1:{suite.router.port}", timeout=300) as client:
            streams = [  # spread over both decode workers: elastic-0's drain waits for its own
                client.complete(text_of_tokens(tokenizer, 24, offset=5 + i), max_tokens=48, ignore_eos=True)
                for i in range(4)
            ]
            running = asyncio.gather(*streams)
            moving = next(w for w in pool.all if w.worker_id == "elastic-0")
            assert await settles(lambda: moving.inflight > 0, timeout=60)
            switch = asyncio.create_task(_switch(suite, "elastic-0", "prefill"))
            assert await settles(lambda: moving.switching_to == "prefill", timeout=30)
            assert moving in pool.all and moving not in pool.prefill + pool.decode
            again = pool.register(moving.info, moving.load)  # its registration, repeated while it drains
            assert again is moving and len(pool.all) == 2
            await running
            assert (await switch).role == ROLE["prefill"]
        assert sorted(w.worker_id for w in pool.all) == ["decode-0", "elastic-0"] and moving in pool.prefill
        await pools_full(suite)


async def test_the_role_balancer_moves_a_real_worker_when_the_live_mix_favours_another_split(smollm2, tmp_path):
    from pdserve.planner.profile import model_key
    from tests.unit.test_role_balancer import PROFILE, arrivals_of

    ref, _, tokenizer = smollm2
    dataclasses.replace(PROFILE, model=model_key(ref), dtype="float32").save(tmp_path / "profile.json")
    router_kw = {
        "balance_profile": str(tmp_path / "profile.json"),
        "balance_interval_s": 3600.0,
        "balance_confirm": 2,
        "balance_dwell_s": 0.0,
        "slo_ttft_ms": 3000.0,
        "slo_tpot_ms": 30.0,
    }
    async with inprocess_suite(
        smollm2, prefill_workers=0, decode_workers=0, elastic=("decode", "decode"), router_kw=router_kw
    ) as suite:
        balancer = suite.router.balancer
        async with AsyncClient(f"127.0.0.1:{suite.router.port}", timeout=120) as client:
            await client.complete(text_of_tokens(tokenizer, 40), max_tokens=2, temperature=0.0)
            # the router tells it what it admits
            assert [(a.prompt_tokens, a.max_tokens) for a in balancer.arrivals] == [(40, 2)]
            balancer.arrivals.clear()
            now = arrivals_of(balancer, rate=1.0, long_share=0.5, output=64)  # long prompts among decodes
            first = await balancer.evaluate(now)  # better by the margin once: not yet
            moved = await balancer.evaluate(now + 1)
            c = await client.complete(text_of_tokens(tokenizer, 64, offset=7), max_tokens=2, temperature=0.0)
        listed = await _listed(suite)
        await pools_full(suite)
    assert first is None and moved in ("elastic-0", "elastic-1"), balancer.last_scores
    assert listed[moved].info.role == ROLE["prefill"]
    assert c.route["prefill_worker_id"] == moved and c.route["disaggregated"]


async def test_the_balancer_refuses_a_profile_of_another_model_naming_both(smollm2, tmp_path, caplog):
    from tests.unit.test_role_balancer import PROFILE, arrivals_of

    PROFILE.save(tmp_path / "profile.json")  # measured for "m@0"
    router_kw = {
        "balance_profile": str(tmp_path / "profile.json"),
        "balance_interval_s": 3600.0,
        "balance_confirm": 1,
        "balance_dwell_s": 0.0,
        "slo_tpot_ms": 30.0,
    }
    async with inprocess_suite(
        smollm2, prefill_workers=0, decode_workers=0, elastic=("decode", "decode"), router_kw=router_kw
    ) as suite:
        balancer = suite.router.balancer
        now = arrivals_of(balancer, rate=1.0, long_share=0.5, output=64)
        assert await balancer.evaluate(now) is None
        listed = await _listed(suite)
    assert "m@0 (bfloat16)" in balancer.refused and "SmolLM2-135M-Instruct@" in balancer.refused
    assert "not balancing" in caplog.text
    assert {w.info.role for w in listed.values()} == {ROLE["decode"]}
