"""KV pool and store sizes left at 0 are chosen from the free memory, within a floor and a cap."""
from __future__ import annotations

import pytest

from pdserve.common import memory
from pdserve.common.memory import GIB, AutoSize
from pdserve.common.worker_config import WorkerConfig
from pdserve.kvstore.config import KVStoreConfig

RULE = AutoSize(fraction=1 / 64, floor_gib=0.25, cap_gib=4.0)


def test_a_given_size_is_kept():
    assert RULE.choose(0.5, available=1000 * GIB) == memory.Sizing(0.5, "given")


@pytest.mark.parametrize("available_gib, chosen, how", [
    (32, 0.5, "1/64 of 32.0 GiB available"),
    (8, 0.25, "the floor; 1/64 of 8.0 GiB available would be 0.12"),
    (1024, 4.0, "the cap; 1/64 of 1024.0 GiB available would be 16.00"),
])
def test_an_unset_size_is_a_share_of_the_free_memory_within_floor_and_cap(available_gib, chosen, how):
    sizing = RULE.choose(0, available=available_gib * GIB)
    assert (sizing.gib, sizing.how) == (chosen, how)
    assert str(sizing) == f"{chosen:.2f} GiB ({how})"


def test_a_cgroup_limit_below_the_machine_s_free_memory_wins(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20971520 kB\n")  # 20 GiB
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert memory.available_bytes(meminfo, cgroup) == 20 * GIB  # no limit file: the machine's figure
    (cgroup / "memory.max").write_text("max\n")
    assert memory.available_bytes(meminfo, cgroup) == 20 * GIB
    (cgroup / "memory.max").write_text(f"{4 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{GIB}\n")
    assert memory.available_bytes(meminfo, cgroup) == 3 * GIB


def test_unknown_free_memory_takes_the_floor(tmp_path):
    assert memory.available_bytes(tmp_path / "absent", tmp_path) is None
    assert memory.available_bytes() is not None  # this machine (Linux) says what it has


def test_a_worker_sizes_its_kv_pool_once_and_says_how():
    auto = WorkerConfig()
    assert auto.kv_cache is auto.kv_cache  # one choice per config, though free memory moves
    assert memory.WORKER_KV.floor_gib <= auto.engine_config().kv_cache_gib == auto.kv_cache.gib
    assert auto.sizes().startswith(f"KV cache {auto.kv_cache.gib:.2f} GiB (")
    assert WorkerConfig(kv_cache_gib=0.5).engine_config().kv_cache_gib == 0.5
    assert WorkerConfig(num_kv_blocks=64).sizes() == "KV cache 64 blocks (given)"


def test_the_store_sizes_its_capacity_from_free_memory_too():
    store = KVStoreConfig()
    assert memory.STORE_CAPACITY.floor_gib <= store.capacity.gib <= memory.STORE_CAPACITY.cap_gib
    assert KVStoreConfig(capacity_gib=1.5).sizes() == "capacity 1.50 GiB (given)"
