"""--dtype auto resolves once, from the device and the CPU's flags, and every worker of a suite agrees."""

from __future__ import annotations

import pytest

from pdserve import launcher
from pdserve.common.config import SettingError
from pdserve.common.engine.config import EngineConfig
from pdserve.common.engine.precision import resolve
from pdserve.common.kv.spec import KVSpec
from pdserve.common.worker_config import WorkerConfig


def cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return str(path)


@pytest.mark.parametrize(
    "flags, dtype, reason",
    [
        ("avx512f avx512_bf16", "bfloat16", "auto: the CPU has avx512_bf16"),
        ("amx_tile amx_bf16 amx_int8", "bfloat16", "auto: the CPU has amx_bf16"),
        ("avx512f", "float32", "auto: the CPU has none of amx_bf16, avx512_bf16"),
    ],
)
def test_auto_on_the_cpu_is_bfloat16_only_with_native_bf16_matmuls(tmp_path, flags, dtype, reason):
    got = resolve("auto", "cpu", cpuinfo=cpuinfo(tmp_path, flags))
    assert (got.dtype, got.reason) == (dtype, reason)
    assert str(got) == f"dtype {dtype} ({reason})"  # the worker's start banner


def test_auto_is_float32_where_onednn_is_held_below_bf16_instructions(tmp_path, monkeypatch):
    amx = cpuinfo(tmp_path, "amx_tile amx_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # an AVX2-only CPU's code paths, on an AMX host
    got = resolve("auto", "cpu", cpuinfo=amx)
    assert (got.dtype, got.reason) == ("float32", "auto: the CPU has amx_bf16, but ONEDNN_MAX_CPU_ISA=AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert resolve("auto", "cpu", cpuinfo=amx).dtype == "bfloat16"


def test_auto_without_proc_cpuinfo_is_float32(tmp_path):
    assert resolve("auto", "cpu", cpuinfo=str(tmp_path / "absent")).dtype == "float32"


def test_auto_is_bfloat16_on_cuda_and_float32_on_other_devices(tmp_path):
    none = cpuinfo(tmp_path, "")
    assert resolve("auto", "cuda:1", cpuinfo=none).dtype == "bfloat16"
    assert resolve("auto", "mps", cpuinfo=none).dtype == "float32"


def test_a_given_dtype_or_a_loaded_model_s_dtype_wins_over_auto(tmp_path):
    bf16_cpu = cpuinfo(tmp_path, "avx512_bf16")
    assert resolve("float32", "cpu", cpuinfo=bf16_cpu).dtype == "float32"
    assert resolve("float16", "cuda").dtype == "float16"
    assert resolve("auto", "cpu", model_dtype="float32", cpuinfo=bf16_cpu).dtype == "float32"


def test_an_unknown_dtype_is_a_setting_error_naming_dtype():
    with pytest.raises(SettingError) as err:
        resolve("int4")
    assert err.value.field == "dtype"
    with pytest.raises(SettingError) as err:
        EngineConfig(dtype="fp32")
    assert err.value.field == "dtype"


def test_workers_default_to_auto():
    assert WorkerConfig().dtype == "auto" == WorkerConfig().engine_config().dtype


def test_kv_of_another_dtype_has_another_fingerprint():
    fp32 = KVSpec("m", "d", 30, 3, 64, 16, "float32")
    bf16 = KVSpec("m", "d", 30, 3, 64, 16, "bfloat16")
    assert fp32.fingerprint != bf16.fingerprint
    assert bf16.block_bytes * 2 == fp32.block_bytes


def test_up_gives_the_workers_its_dtype_and_the_store_the_resolved_one():
    def dtypes(**kw):
        return {
            s.name: s.argv[s.argv.index("--dtype") + 1] if "--dtype" in s.argv else None
            for s in launcher.plan("disaggregated", 1, 1, python="py", **kw)
        }

    assert dtypes(dtype="float32") == {
        "model": None,
        "prefill-0": "float32",
        "decode-0": "float32",
        "kvstore": "float32",
        "router": None,
    }
    on_cuda = dtypes(device="cuda")  # the store sizes blocks as the workers on CUDA resolve auto
    assert (on_cuda["prefill-0"], on_cuda["kvstore"]) == (None, "bfloat16")
    assert dtypes()["kvstore"] == resolve("auto").dtype
