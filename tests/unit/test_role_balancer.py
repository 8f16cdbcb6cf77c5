"""The role balancer: which split of the elastic workers the live mix favours, and the
hysteresis that keeps roles from flapping (issue #18 item 5). The switch itself, on real
workers, is tests/service/test_elastic_roles.py."""

from __future__ import annotations

import random

import pytest

from pdserve.planner.planner import Objectives
from pdserve.planner.profile import Profile, StepModel
from pdserve.router.role_balancer import BalancerConfig, Hysteresis, RoleBalancer
from pdserve.router.worker_handle import WorkerHandle
from pdserve.router.worker_pool import WorkerPool
from pdserve.v1 import common_pb2 as pb

# One thread per worker: a decode step costs 20 ms + 0.5 ms a sequence; a prompt token 0.6 ms.
PROFILE = Profile(
    "m@0",
    "bfloat16",
    "cpu: test",
    16,
    {1: StepModel(20.0, 0.5, 0.0, 0.6, 0.0)},
    transfer_ms_per_block=0.05,
    transfer_base_ms=2.0,
    router_hop_ms=1.0,
)
OBJECTIVES = Objectives(ttft_ms=3000, tpot_ms=30)


def _elastic(name: str, role: str) -> WorkerHandle:
    info = pb.WorkerInfo(
        worker_id=name, elastic=True, role={"prefill": pb.WORKER_ROLE_PREFILL, "decode": pb.WORKER_ROLE_DECODE}[role]
    )
    return WorkerHandle(name, role, channel=None, info=info, healthy=True)


def _balancer(prefill: int, decode: int) -> RoleBalancer:
    pool = WorkerPool(
        prefill=[_elastic(f"p{i}", "prefill") for i in range(prefill)],
        decode=[_elastic(f"d{i}", "decode") for i in range(decode)],
    )
    return RoleBalancer(pool, PROFILE, OBJECTIVES, BalancerConfig(window_s=120))


def arrivals_of(b: RoleBalancer, rate: float, long_share: float, output: int, seconds: float = 100) -> float:
    rng, t = random.Random(0), 0.0
    while t < seconds:
        b.observe(1500 if rng.random() < long_share else 16, output, now=t)
        t += rng.expovariate(rate)
    return t


def test_long_prompts_among_decodes_favour_a_prefill_worker():
    b = _balancer(prefill=0, decode=2)
    now = arrivals_of(b, rate=1.0, long_share=0.5, output=64)
    scores = b.scores(now)
    assert set(scores) == {0, 1}  # 2 colocated, or 1P+1D (no split without a decode worker)
    assert scores[1] >= scores[0] + 0.1, scores


def test_short_prompts_with_many_decodes_favour_two_decode_workers():
    b = _balancer(prefill=1, decode=1)
    now = arrivals_of(b, rate=4.0, long_share=0.0, output=128)
    scores = b.scores(now)
    assert scores[0] >= scores[1] + 0.1, scores


def test_too_few_arrivals_or_no_movable_worker_means_no_opinion():
    b = _balancer(prefill=1, decode=1)
    for t in range(5):
        b.observe(100, 16, now=float(t))
    assert b.scores(5.0) == {}
    fixed = RoleBalancer(
        WorkerPool(decode=[WorkerHandle("d", "decode", channel=None, info=pb.WorkerInfo(worker_id="d"), healthy=True)]),
        PROFILE,
        OBJECTIVES,
        BalancerConfig(),
    )
    arrivals_of(fixed, rate=1.0, long_share=0.5, output=16)
    assert fixed.scores(100.0) == {}


def test_arrivals_older_than_the_window_are_forgotten():
    b = _balancer(prefill=1, decode=1)
    b.observe(100, 16, now=0.0)
    b.observe(100, 16, now=200.0)
    assert [a.at for a in b.arrivals] == [200.0]


def test_a_better_split_is_taken_only_after_winning_by_the_margin_several_times_in_a_row():
    h = Hysteresis(margin=0.1, confirm=3, dwell_s=0)
    assert h.step(0, current=1, scores={0: 0.95, 1: 0.9}) is None  # within the margin: stay
    assert [h.step(t, 1, {0: 0.95, 1: 0.5}) for t in (1, 2)] == [None, None]
    assert h.step(3, 1, {0: 0.95, 1: 0.5}) == 0


def test_a_mix_that_swings_back_and_forth_does_not_flap_the_roles():
    h = Hysteresis(margin=0.1, confirm=3, dwell_s=0)
    swings = [{0: 0.9, 1: 0.5}, {0: 0.9, 1: 0.5}, {0: 0.5, 1: 0.9}] * 5  # never three wins in a row
    assert [h.step(t, 1, s) for t, s in enumerate(swings)] == [None] * len(swings)


def test_no_switch_sooner_than_the_dwell_time_after_the_last():
    h = Hysteresis(margin=0.1, confirm=1, dwell_s=60)
    assert h.step(0, 1, {0: 0.9, 1: 0.5}) == 0
    assert h.step(30, 0, {0: 0.5, 1: 0.9}) is None  # better, but too soon
    assert h.step(61, 0, {0: 0.5, 1: 0.9}) == 1


@pytest.mark.parametrize("scores", [{0: 0.8, 1: 0.8}, {1: 0.8}])
def test_a_tie_keeps_the_current_split(scores):
    assert Hysteresis(margin=0.0, confirm=1, dwell_s=0).step(0, 1, scores) is None


def test_a_role_reported_before_the_last_switch_is_not_followed():
    # A poll answered just before a switch and read just after it must not undo the switch.
    pool = WorkerPool(decode=[_elastic("e", "decode")])
    w = pool.decode[0]
    w.info.role_epoch = 2  # the switch to decode this router saw
    stale = pb.WorkerInfo(worker_id="e", elastic=True, role=pb.WORKER_ROLE_PREFILL, role_epoch=1)
    pool._take_info(w, stale)
    pool._follow(w)
    assert (pool.prefill, pool.decode) == ([], [w])
    later = pb.WorkerInfo(worker_id="e", elastic=True, role=pb.WORKER_ROLE_PREFILL, role_epoch=3)  # switched again
    pool._take_info(w, later)
    pool._follow(w)
    assert (pool.prefill, pool.decode) == ([w], [])


def test_a_restarted_worker_is_routed_as_the_role_it_starts_in_whatever_its_old_epochs():
    pool = WorkerPool(prefill=[_elastic("e", "prefill")])
    w = pool.prefill[0]
    w.info.role_epoch, w.info.instance_id = 3, "first-process"  # switched to prefill three times
    restarted = pb.WorkerInfo(worker_id="e", elastic=True, role=pb.WORKER_ROLE_DECODE, instance_id="second-process")
    pool._take_info(w, restarted)  # epoch 0: its own first
    pool._follow(w)
    assert (pool.prefill, pool.decode) == ([], [w])


def test_a_worker_refusing_the_work_of_a_role_it_has_left_is_not_called_unhealthy():
    # A call planned just before a switch reaches the worker just after it: the refusal
    # (UNAVAILABLE) is retried elsewhere, and the worker stays routable for its new role.
    w = _elastic("e", "prefill")
    assert not w.has_left("prefill") and w.has_left("decode")
    w.switching_to = "decode"
    assert w.has_left("prefill")
    w.switching_to, w.role = "", "decode"
    assert w.has_left("prefill") and not w.has_left("decode")
    fixed = WorkerHandle("d", "decode", channel=None, info=pb.WorkerInfo(worker_id="d"), healthy=True)
    assert not fixed.has_left("prefill")  # a fixed worker's refusal is a failure like any other
