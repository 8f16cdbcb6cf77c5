"""What the SDK says about a bad call: the field it refuses, before any RPC, and
a target that is not a router (a real worker's port) named as such."""

from __future__ import annotations

import asyncio
import sys

import grpc
import pytest

from pdserve import client as sdk
from pdserve.bench.null_worker import NullWorker, NullWorkerConfig


@pytest.mark.parametrize(
    "call, field, reason",
    [
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens", "must be an integer in [1, 2**32), got -1"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "must be an integer in [1, 2**32), got 0"),
        ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens", "must be an integer in [1, 2**32), got 2.5"),
        ({"prompt": "hi", "top_k": -2}, "top_k", "must be an integer in [0, 2**32), got -2"),
        ({"prompt": "hi", "seed": -(2**63) - 1}, "seed", f"must be an integer in [0, 2**64), got {-(2**63) - 1}"),
        ({"prompt": "hi", "seed": 2**64}, "seed", f"must be an integer in [0, 2**64), got {2**64}"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", "must be a number, got 'hot'"),
        ({"prompt": "hi", "ignore_eos": 1}, "ignore_eos", "must be True or False, got 1"),
        ({"prompt": "hi", "stop": [None]}, "stop[0]", "must be a string, got None"),
        ({"prompt": "hi", "stop": ["\n", 3]}, "stop[1]", "must be a string, got 3"),
        ({"prompt": "hi", "stop": 5}, "stop", "must be a string or a list of strings, got 5"),
        ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids[0]", "must be an integer in [0, 2**32), got -1"),
        ({"prompt": [1, -2]}, "prompt[1]", "must be an integer in [0, 2**32), got -2"),
        ({"prompt": 5}, "prompt", "must be a string or a list of token ids, got 5"),
        (
            {"messages": [{"role": "user"}]},
            "messages[0].content",
            "is missing: each message needs a role and a content string",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]},
            "messages[1].role",
            "is missing: each message needs a role and a content string",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "must be a string, got None"),
        ({"messages": ["hi"]}, "messages[0]", 'must be a {"role": ..., "content": ...} mapping, got \'hi\''),
        ({"messages": "hi"}, "messages", 'must be a list of {"role": ..., "content": ...} mappings, got \'hi\''),
    ],
)
async def test_a_bad_argument_is_refused_at_the_call_naming_its_field(call, field, reason):
    # Nothing listens at the target: an RPC would fail UNAVAILABLE, not INVALID_ARGUMENT.
    async with sdk.AsyncClient("127.0.0.1:1") as client:
        with pytest.raises(sdk.InvalidArgument) as info:
            client.generate(**call)
    err = info.value
    assert (err.field, err.details) == (field, f"{field}: {reason}")
    assert str(err) == f"INVALID_ARGUMENT: {field}: {reason}"  # the field once, as the server's errors read


def test_numpy_integers_and_none_are_accepted_as_protobuf_would_take_them():
    np = pytest.importorskip("numpy")
    request = sdk.build_request(
        np.array([5, 6]), max_tokens=np.int64(3), temperature=np.float32(0.5), stop=None, seed=2**64 - 1
    )
    assert list(request.token_ids.ids) == [5, 6] and request.sampling.max_tokens == 3
    assert request.sampling.seed == 2**64 - 1 and list(request.sampling.stop) == []


def test_minus_one_means_off_for_top_k_and_seed_as_over_http():
    request = sdk.build_request("hi", top_k=-1, seed=-1)
    assert request.sampling.top_k == 0 and not request.sampling.HasField("seed")
    assert sdk.build_request("hi", seed=-5).sampling.seed == 2**64 - 5  # its 64-bit pattern, as the server reads it


@pytest.fixture
async def worker_target():
    """A real worker's port: the null engine's Decode service, which has no Router."""
    worker = NullWorker(NullWorkerConfig(port=0))
    await worker.start()
    yield f"127.0.0.1:{worker.port}"
    await worker.aclose()


async def test_a_workers_port_is_named_as_not_a_router(worker_target):
    async with sdk.AsyncClient(worker_target) as client:
        with pytest.raises(sdk.PdserveClientError) as info:
            await client.complete("hi", max_tokens=4)
    err = info.value
    assert err.code is grpc.StatusCode.UNIMPLEMENTED
    assert str(err) == (
        f"UNIMPLEMENTED: {worker_target} does not serve pdserve.v1.Router (Method not found!): "
        "is it a worker? Point the client (pdserve generate --target) at the router"
    )


async def test_pdserve_generate_at_a_workers_port_says_so_in_one_line(worker_target):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pdserve",
        "generate",
        "hi",
        "--target",
        worker_target,
        "--max-tokens",
        "4",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)  # served by this loop meanwhile
    lines = err.decode().splitlines()
    assert proc.returncode == 1 and out == b""
    assert len(lines) == 1 and lines[0].startswith(
        f"pdserve: UNIMPLEMENTED: {worker_target} does not serve pdserve.v1.Router"
    )
    assert "pdserve generate --target" in lines[0]
