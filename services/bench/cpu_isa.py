"""`--as-cpu avx2`: a benchmark's systems on the code paths of an AVX2-only CPU, run on an AVX-512 or AMX host.

Sessions draw their CPU by chance, and an AVX2-only one has not come up since the AMX work began, so this
is how those paths are measured: torch's kernels (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA), MKL
(MKL_ENABLE_INSTRUCTIONS) and pdserve's kernels (PDSERVE_KERNEL_MARCH) are held to AVX2 and FMA. vLLM's
CPU build picks its kernels from torch.cpu's feature probes, so a sitecustomize on its PYTHONPATH makes
those answer as an AVX2-only CPU's would. The memory, the cores and the clock stay the host's: the
figures are of the code paths, not of another machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pdserve.common.model_loader import cache_dir

CHOICES = ("native", "avx2")
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "PDSERVE_KERNEL_MARCH": "x86-64-v3",
}
# torch.cpu's probes past AVX2; vLLM's CPU platform and attention backends ask them.
PROBES = ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported", "_is_amx_tile_supported",
          "_is_amx_fp16_supported")  # fmt: skip
SITECUSTOMIZE = (
    "# pdserve bench --as-cpu avx2: torch.cpu's probes answer as an AVX2-only CPU's would\n"
    "try:\n"
    "    import torch.cpu\n"
    "except ImportError:  # an environment without torch: nothing to answer for\n"
    "    pass\n"
    "else:\n"
    f"    for _name in {PROBES!r}:\n"
    "        setattr(torch.cpu, _name, lambda: False)\n"
)


def environment(isa: str) -> dict[str, str]:
    """The variables every system of the run gets for `isa` (none for native)."""
    return dict(AVX2_ENV) if isa == "avx2" else {}


def probe_shim(isa: str) -> dict[str, str]:
    """PYTHONPATH with the probes' sitecustomize, for a peer that chooses its kernels by torch.cpu's probes."""
    if isa != "avx2":
        return {}
    folder = cache_dir().parent / "peers" / "as-avx2"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)}


def reexec_as(isa: str) -> None:
    """Run this command again with `isa`'s variables set from the start (torch reads them when it loads)."""
    env = environment(isa)
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    print(f"re-running as an {isa}-only CPU: {' '.join(f'{k}={v}' for k, v in env.items())}", flush=True)
    os.execve(sys.executable, [sys.executable, str(Path(sys.argv[0])), *sys.argv[1:]], {**os.environ, **env})
