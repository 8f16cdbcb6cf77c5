"""Core pinning: the --cpus setting, and the thread it pins."""

import os
import threading

import pytest

from pdserve.common import affinity
from pdserve.common.config import SettingError
from pdserve.common.worker_config import WorkerConfig


def test_core_lists_parse_like_taskset_s():
    assert affinity.parse("0") == [0]
    assert affinity.parse("0,2") == [0, 2]
    assert affinity.parse("1-3") == [1, 2, 3]
    assert affinity.parse("0, 4-5") == [0, 4, 5]
    for bad in ("", "a", "1-", "3-1", "-1", "0;1"):
        with pytest.raises(ValueError, match="not a list of cores"):
            affinity.parse(bad)


def test_a_worker_refuses_cores_it_cannot_run_on_naming_the_setting():
    with pytest.raises(SettingError, match="cpus"):
        WorkerConfig(cpus="first")
    with pytest.raises(SettingError, match=r"cpus.*not among this machine's"):
        WorkerConfig(cpus=str(max(affinity.available()) + 1))
    assert WorkerConfig(cpus=str(affinity.available()[-1])).engine_cpus() == [affinity.available()[-1]]
    assert WorkerConfig().engine_cpus() == []  # not pinned


def test_pinning_a_thread_leaves_the_rest_of_the_process_where_it_was():
    before, core = os.sched_getaffinity(0), affinity.available()[-1]
    seen = {}

    def pinned():
        affinity.pin_thread([core])
        seen["own"] = os.sched_getaffinity(0)
        child = threading.Thread(target=lambda: seen.update(child=os.sched_getaffinity(0)))
        child.start()
        child.join()

    t = threading.Thread(target=pinned)
    t.start()
    t.join()
    assert seen == {"own": {core}, "child": {core}}  # threads it starts inherit it
    assert os.sched_getaffinity(0) == before
