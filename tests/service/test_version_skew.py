"""A fleet mid-upgrade: a prefill worker that states another KV wire version is never paired
with decode workers of this one, in either direction, and every request still succeeds
(prefilled on its decode worker). ListWorkers says why. Real gRPC servers, UCX and SmolLM2."""

from __future__ import annotations

import pytest

from pdserve.client import AsyncClient
from pdserve.common.kv.spec import WIRE_VERSION
from pdserve.v1 import router_pb2 as rpb
from tests.engine.prompts import text_of_tokens
from tests.service.suite import inprocess_suite, pools_full


async def _routes(suite, tokenizer) -> list[dict]:
    async with AsyncClient(f"127.0.0.1:{suite.router.port}", timeout=120) as client:
        done = [
            await client.complete(text_of_tokens(tokenizer, 48, offset=90 + i), max_tokens=4, temperature=0.0)
            for i in range(3)
        ]
    assert all(len(c.token_ids) == 4 for c in done)
    return [c.route for c in done]


@pytest.mark.parametrize("advertised", [WIRE_VERSION, WIRE_VERSION + 1])
async def test_kv_moves_only_between_workers_of_one_wire_version(smollm2, advertised):
    _, _, tokenizer = smollm2
    async with inprocess_suite(smollm2, prefill_kw={"advertise_kv_wire_version": advertised}) as suite:
        routes = await _routes(suite, tokenizer)  # the router never prefills locally by choice here
        listed = {w.info.worker_id: w for w in (await suite.stub.ListWorkers(rpb.ListWorkersRequest())).workers}
        computed = suite.prefill[0].engine.stats().computed_tokens
        await pools_full(suite)
    assert listed["prefill-0"].info.kv_wire_version == advertised and listed["decode-0"].info.software_version
    if advertised == WIRE_VERSION:  # the control: the same suite pairs them
        assert all(r["disaggregated"] and r["prefill_worker_id"] == "prefill-0" for r in routes)
        assert listed["prefill-0"].unpaired == listed["decode-0"].unpaired == ""
        return
    assert not any(r["disaggregated"] or r["prefill_worker_id"] for r in routes)
    assert computed == 0  # it computed no prompt, so it sent no KV (and a prefill worker takes none)
    assert (
        listed["prefill-0"].unpaired
        == f"KV wire version {advertised}; the other phase's workers speak [{WIRE_VERSION}]"
    )
    assert (
        listed["decode-0"].unpaired == f"KV wire version {WIRE_VERSION}; the other phase's workers speak [{advertised}]"
    )
