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


def _cgroup(d, v2: str | None = None, v1: tuple[str, str] | None = None):
    d.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (d / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (d / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (d / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return d


def test_a_containers_cpu_limit_is_read_from_cgroup_v2_or_v1(tmp_path):
    v2 = tmp_path / "v2"
    _cgroup(v2, v2="max 100000")  # the root: no limit
    assert affinity.cpu_quota(v2, own="/") is None
    _cgroup(v2 / "system.slice" / "pdserve-prefill@50061.service", v2="150000 100000")  # a unit's CPUQuota=150%
    assert affinity.cpu_quota(v2, own="/system.slice/pdserve-prefill@50061.service") == 1.5
    assert affinity.cpu_quota(v2, own="/docker/elsewhere") is None  # a path not mounted here: its root's
    _cgroup(tmp_path / "v1" / "cpu", v1=("200000", "100000"))  # a container's own cgroup at the root
    assert affinity.cpu_quota(tmp_path / "v1", own="/docker/0123") == 2.0
    _cgroup(tmp_path / "v1-none" / "cpu", v1=("-1", "100000"))
    assert affinity.cpu_quota(tmp_path / "v1-none", own="/") is None
    assert affinity.cpu_quota(tmp_path / "nothing", own="/") is None
    assert affinity.usable_cores(v2, own="/system.slice/pdserve-prefill@50061.service") == min(
        2, len(affinity.available())
    )


def test_a_worker_runs_a_torch_thread_per_core_it_may_use():
    cores = affinity.available()
    assert WorkerConfig(threads=3).torch_threads(default=64) == 3  # asked for
    assert WorkerConfig(cpus=str(cores[-1])).torch_threads(default=64) == 1  # not 64 on one core
    assert WorkerConfig().torch_threads(default=1) == 1  # never above torch's (physical cores)
    assert WorkerConfig().torch_threads(default=4096) == affinity.usable_cores()
