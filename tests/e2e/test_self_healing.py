"""`pdserve up --prefill 2 --decode 2` heals itself: a SIGKILLed worker or KV store is
started again while the suite serves on, and the client's greedy stream is the unfaulted
one. Real `pdserve up`, real processes and signals, SmolLM2 in float32 (a bfloat16
re-prefill may flip a near tie: docs/reliability.md)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from pdserve.client import AsyncClient
from pdserve.client.errors import PdserveClientError
from pdserve.launcher import run_state
from pdserve.launcher.status import list_workers
from pdserve.v1 import kvstore_pb2
from pdserve.v1.kvstore_pb2_grpc import KVStoreStub
from tests.e2e.conftest import free_port_run
from tests.e2e.streams import greedy_stream
from tests.engine.prompts import text_of_tokens
from tests.polling import eventually, settles

TOKENS = 40
BACK_WITHIN_S = 15.0  # the bound, model load included


class Up:
    """A running `pdserve up` and the state file it keeps."""

    def __init__(self, tmp_path):
        self.port = free_port_run(6)
        self.env = {**os.environ, "PDSERVE_RUN_DIR": str(tmp_path), "PDSERVE_LOCAL_PREFILL": "never"}
        self.log = open(tmp_path / "up.log", "w+")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pdserve",
                "up",
                "--prefill",
                "2",
                "--decode",
                "2",
                "--port",
                str(self.port),
                "--base-port",
                str(self.port + 1),
                "--http-port",
                "-1",
                "--metrics-port",
                "-1",
                "--kv-cache-gib",
                "0.25",
                "--dtype",
                "float32",
                "--ready-timeout",
                "240",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        self.target = f"127.0.0.1:{self.port}"
        self.path = run_state.state_path(self.port, self.env)

    def services(self) -> dict[str, dict]:
        return {s["name"]: s for s in (run_state.read(self.path) or {}).get("services", [])}

    def output(self) -> str:
        self.log.flush()
        return open(self.log.name).read()

    def back(self, name: str, restarts: int) -> bool:
        s = self.services().get(name)
        seen = {w.info.worker_id for w in list_workers(self.target) or [] if w.healthy}
        return bool(
            s
            and s["phase"] == "serving"
            and s["restarts"] == restarts
            and (s["role"] not in ("prefill", "decode") or name in seen)
        )


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    suite = Up(tmp_path_factory.mktemp("up"))
    ready = eventually(lambda: "ready; clients connect" in suite.output() or suite.proc.poll() is not None, 240)
    assert ready and suite.proc.poll() is None, suite.output()[-3000:]
    yield suite
    suite.proc.send_signal(signal.SIGTERM)
    suite.proc.wait(60)
    assert not suite.path.exists()  # the state file goes with the suite


async def _faulted_stream(up, tokenizer, offset: int, victim_of, after_tokens: int = 6):
    """A greedy stream with `victim_of()`'s process SIGKILLed once `after_tokens` arrived: the
    tokens it gets, the unfaulted ones, the victim's name and when it was killed."""
    ids = text_of_tokens(tokenizer, 60, offset=offset)
    async with AsyncClient(up.target, timeout=120) as client:
        expected = (await client.complete(ids, max_tokens=TOKENS, ignore_eos=True, temperature=0.0)).token_ids
        seen: list[int] = []
        call = asyncio.create_task(greedy_stream(client, ids, TOKENS, seen))
        assert await settles(lambda: len(seen) >= after_tokens or call.done(), timeout=120, interval=0.01)
        victim = await victim_of()
        os.kill(up.services()[victim]["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        result = await asyncio.wait_for(call, 120)
    return seen, expected, result, victim, killed_at


def _assert_back_in_time(up, name: str, killed_at: float) -> None:
    assert eventually(lambda: up.back(name, restarts=1), BACK_WITHIN_S + 30, interval=0.2), up.output()[-3000:]
    took = time.monotonic() - killed_at
    print(f"{name} back and listed healthy by the router {took:.1f} s after SIGKILL")
    assert took <= BACK_WITHIN_S
    assert up.proc.poll() is None and "stopping the suite" not in up.output()


async def test_a_killed_decode_worker_is_back_within_15s_and_its_stream_is_the_unfaulted_one(up, smollm2_tokenizer):
    async def busy_decoder() -> str:
        async def running():
            return next(
                (
                    w.info.worker_id
                    for w in list_workers(up.target) or []
                    if w.info.worker_id.startswith("decode") and w.load.running_seqs
                ),
                None,
            )

        return await settles(running, timeout=30, interval=0.05)

    seen, expected, result, victim, killed_at = await _faulted_stream(up, smollm2_tokenizer, 41, busy_decoder)
    assert seen == expected and result.route["decode_worker_id"] != victim
    _assert_back_in_time(up, victim, killed_at)
    assert f"{victim}: restarting in the spare process" in up.output()  # its imports were done before
    async with AsyncClient(up.target, timeout=120) as client:  # and it takes requests again
        routes = await asyncio.gather(
            *(
                client.complete(text_of_tokens(smollm2_tokenizer, 20, offset=50 + i), max_tokens=4, temperature=0.0)
                for i in range(6)
            )
        )
    assert victim in {r.route["decode_worker_id"] for r in routes}


async def test_a_killed_prefill_worker_and_kv_store_are_back_within_15s_while_streams_go_on(up, smollm2_tokenizer):
    for name, offset in (("prefill-0", 43), ("kvstore", 45)):

        async def chosen(name=name) -> str:
            return name

        seen, expected, result, victim, killed_at = await _faulted_stream(up, smollm2_tokenizer, offset, chosen)
        assert seen == expected and result.usage.completion_tokens == TOKENS
        _assert_back_in_time(up, name, killed_at)
    # the spare the decode worker's restart used was replaced, for the prefill worker's; only workers use one
    assert "prefill-0: restarting in the spare process" in up.output()
    assert "kvstore: restarting in the spare" not in up.output()
    async with AsyncClient(up.target, timeout=120) as client:  # the suite serves, prefill workers and store back
        after = await client.complete(text_of_tokens(smollm2_tokenizer, 60, offset=47), max_tokens=4, temperature=0.0)
    assert len(after.token_ids) == 4 and after.route["prefill_worker_id"].startswith("prefill")

    async def written() -> int:  # the prefill workers write to the store's new process
        async with grpc.aio.insecure_channel(up.services()["kvstore"]["address"]) as channel:
            stats = await KVStoreStub(channel).GetStats(kvstore_pb2.GetStoreStatsRequest(), timeout=5)
        return stats.blocks_written

    assert await settles(written, timeout=10)


def _status_rows(up) -> dict[str, dict]:
    shown = subprocess.run(
        [sys.executable, "-m", "pdserve", "status", "--target", up.target, "--json"],
        capture_output=True,
        text=True,
        env=up.env,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    return {r["name"]: r for r in json.loads(shown.stdout)["services"]}


def test_status_lists_every_service_with_its_health_load_restarts_and_version(up):
    def idle() -> dict[str, dict] | None:
        rows = _status_rows(up)
        return rows if rows.get("decode-0", {}).get("running") == 0 else None

    # Loads come with the workers' heartbeats (every 0.5 s): the last test's streams may still be
    # counted for a moment on a busy machine, but must drain.
    rows = eventually(idle, timeout=15) or _status_rows(up)
    assert set(rows) == {"prefill-0", "prefill-1", "decode-0", "decode-1", "kvstore", "router"}
    assert all(r["health"] == "serving" and r["version"] and r["uptime_s"] > 0 for r in rows.values())
    assert {rows[n]["role"] for n in ("decode-0", "decode-1")} == {"decode"}
    assert rows["decode-0"]["running"] == 0 and 0 <= rows["decode-0"]["kv_used"] < 1
    assert rows["router"]["running"] is None  # the launcher's row: the router does not list itself
    table = subprocess.run(
        [sys.executable, "-m", "pdserve", "status", "--target", up.target],
        capture_output=True,
        text=True,
        env=up.env,
        timeout=60,
    ).stdout
    assert table.split("\n")[0].split() == [
        "name",
        "role",
        "address",
        "health",
        "running",
        "waiting",
        "kv_used",
        "restarts",
        "uptime_s",
        "version",
    ]


async def test_a_rolling_restart_under_load_fails_no_request_and_changes_no_token(up, smollm2_tokenizer):
    prompts = [text_of_tokens(smollm2_tokenizer, 40, offset=60 + i) for i in range(4)]
    async with AsyncClient(up.target, timeout=120) as client:

        async def run(ids):
            return (await client.complete(ids, max_tokens=24, ignore_eos=True, temperature=0.0)).token_ids

        reference = [await run(ids) for ids in prompts]
        before = {n: s["pid"] for n, s in up.services().items()}
        spare_restarts = up.output().count("restarting in the spare process")
        restart = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pdserve",
            "restart",
            "--rolling",
            "--target",
            up.target,
            "--wait",
            "240",
            env=up.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        outputs = []
        while restart.returncode is None:  # closed-loop load for as long as the restart takes
            outputs += zip(prompts, await asyncio.gather(*(run(ids) for ids in prompts)))
        said = (await restart.stdout.read()).decode()
    assert restart.returncode == 0, said + up.output()[-3000:]
    after = up.services()
    workers = [n for n in after if n.startswith(("prefill", "decode"))]
    assert all(after[n]["pid"] != before[n] for n in workers)  # every worker is a new process
    assert after["router"]["pid"] == before["router"] and after["kvstore"]["pid"] == before["kvstore"]
    assert len(outputs) >= 4 * len(workers)  # requests ran through every step of the roll
    assert all(tokens == reference[prompts.index(ids)] for ids, tokens in outputs)
    assert "rolling restart: decode-1 is back; done" in up.output()
    # a roll may be of new code: fresh processes, not the spare's imports
    assert up.output().count("restarting in the spare process") == spare_restarts


async def test_a_killed_router_breaks_its_streams_with_unavailable_and_is_back_within_15s(up, smollm2_tokenizer):
    ids = text_of_tokens(smollm2_tokenizer, 40, offset=70)
    async with AsyncClient(up.target, timeout=120) as client:
        seen: list[int] = []
        call = asyncio.create_task(greedy_stream(client, ids, TOKENS, seen))
        assert await settles(lambda: len(seen) >= 4 or call.done(), timeout=120, interval=0.01)
        os.kill(up.services()["router"]["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(PdserveClientError) as broken:  # an error, never an empty success
            await asyncio.wait_for(call, 60)
        assert broken.value.code == grpc.StatusCode.UNAVAILABLE and 4 <= len(seen) < TOKENS
        # A call made while the router is down is carried over its restart by the SDK's default retries.
        assert len((await client.complete(ids, max_tokens=4, temperature=0.0)).token_ids) == 4
    _assert_back_in_time(up, "router", killed_at)
    assert eventually(lambda: len([w for w in list_workers(up.target) or [] if w.healthy]) == 4, 10)
    async with AsyncClient(up.target, timeout=120) as client:
        assert len((await client.complete(ids, max_tokens=4, temperature=0.0)).token_ids) == 4
