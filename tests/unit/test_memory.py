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


@pytest.mark.parametrize(
    "available_gib, chosen, how",
    [
        (32, 0.5, "1/64 of 32.0 GiB available"),
        (8, 0.25, "the floor; 1/64 of 8.0 GiB available would be 0.12"),
        (1024, 4.0, "the cap; 1/64 of 1024.0 GiB available would be 16.00"),
    ],
)
def test_an_unset_size_is_a_share_of_the_free_memory_within_floor_and_cap(available_gib, chosen, how):
    sizing = RULE.choose(0, available=available_gib * GIB)
    assert (sizing.gib, sizing.how) == (chosen, how)
    assert str(sizing) == f"{chosen:.2f} GiB ({how})"


def meminfo(tmp_path, available_gib: int):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       24000000 kB\nMemAvailable:   {available_gib * 1024 * 1024} kB\n")
    return path


def group(root, path: str, **files: int | str):
    folder = root / path
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (folder / name.replace("_", ".", 1) if name.startswith("memory_") else folder / name).write_text(f"{value}\n")
    return folder


def test_a_cgroup_v2_limit_below_the_machine_s_free_memory_wins(tmp_path):
    cgroups, own = tmp_path / "cgroup", tmp_path / "self"
    own.write_text("0::/\n")
    group(cgroups, "")
    assert memory.available_bytes(meminfo(tmp_path, 20), cgroups, own) == 20 * GIB  # no limit: the machine's
    group(cgroups, "", memory_max="max")
    assert memory.available_bytes(meminfo(tmp_path, 20), cgroups, own) == 20 * GIB
    # 4 GiB allowed, 2 GiB charged of which 1 GiB is page cache it could drop (the model's file).
    group(cgroups, "", memory_max=4 * GIB, memory_current=2 * GIB)
    (cgroups / "memory.stat").write_text(f"anon 1\ninactive_file {GIB}\n")
    assert memory.available_bytes(meminfo(tmp_path, 20), cgroups, own) == 3 * GIB


def test_the_tightest_of_this_process_s_group_and_its_ancestors_counts(tmp_path):
    cgroups, own = tmp_path / "cgroup", tmp_path / "self"
    own.write_text("0::/system.slice/pdserve.service\n")
    group(cgroups, "system.slice", memory_max=6 * GIB, memory_current=GIB)
    group(cgroups, "system.slice/pdserve.service", memory_max="max", memory_current=GIB)
    assert memory.available_bytes(meminfo(tmp_path, 20), cgroups, own) == 5 * GIB


def test_a_cgroup_v1_memory_limit_counts_too(tmp_path):
    cgroups, own = tmp_path / "cgroup", tmp_path / "self"
    own.write_text("4:memory:/docker/abc\n0::/\n")
    group(cgroups / "memory", "", memory_limit_in_bytes=9223372036854771712)  # no limit
    group(cgroups / "memory", "docker/abc", memory_limit_in_bytes=4 * GIB, memory_usage_in_bytes=GIB)
    assert memory.available_bytes(meminfo(tmp_path, 20), cgroups, own) == 3 * GIB


def test_unknown_free_memory_takes_the_floor(tmp_path):
    assert memory.available_bytes(tmp_path / "absent", tmp_path, tmp_path / "absent") is None
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
