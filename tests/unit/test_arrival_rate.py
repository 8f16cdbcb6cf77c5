"""A worker's arrival rate: recent requests per second, forgetting old ones."""

from __future__ import annotations

import pytest

from pdserve.router.arrival_rate import ArrivalRate


def test_a_steady_stream_reads_as_its_rate():
    meter = ArrivalRate(window_s=30.0)
    for i in range(600):  # 2 per second for 300 s
        meter.add(now=i * 0.5)
    assert meter.per_s(now=300.0) == pytest.approx(2.0, rel=0.02)


def test_the_rate_decays_once_requests_stop():
    meter = ArrivalRate(window_s=30.0)
    for i in range(600):
        meter.add(now=i * 0.5)
    assert meter.per_s(now=330.0) == pytest.approx(2.0 / 2.718, rel=0.05)  # one window later
    assert meter.per_s(now=600.0) < 0.001


def test_nothing_arrived_reads_zero():
    assert ArrivalRate().per_s() == 0.0
