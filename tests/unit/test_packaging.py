"""The wheel `pip install pdserve` builds carries every file the package needs at run time.

The README's own commands install editable, from the source tree, so a file left out of
setup.py's package_data only shows in a wheel: a container image (`pip install .`) or a
user's `pip install "pdserve[worker]"`. The kernels' headers were such files: without them
the C++ kernels did not build and workers ran on the torch-only path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Where each source folder lands in the wheel (setup.py's package_dir).
TREES = {ROOT / "services": "pdserve", ROOT / "protos" / "pdserve" / "v1": "pdserve/v1"}
BUILT = {"__pycache__", ".pytest_cache"}


def package_files() -> set[str]:
    """Every file of the source trees, named as the wheel names it (build outputs left out)."""
    names = set()
    for tree, prefix in TREES.items():
        for path in tree.rglob("*"):
            rel = path.relative_to(tree)
            if path.is_file() and not BUILT & set(rel.parts) and path.suffix not in {".pyc", ".so"}:
                names.add(f"{prefix}/{rel.as_posix()}")
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # From a copy of the sources: setuptools reuses a tree's build/ folder, whose files an earlier
    # build may have put there. No build isolation: the venv's setuptools, and no index needed.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for tree in ("services", "protos"):
        shutil.copytree(ROOT / tree, src / tree, ignore=shutil.ignore_patterns(*BUILT, "*.pyc", "*.so"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (built,) = out.glob("pdserve-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_carries_every_file_of_the_package(wheel):
    # The protos folder's generated stubs and .proto sources, the kernels' .cpp and .h, py.typed.
    missing = package_files() - set(wheel.namelist())
    assert not missing, f"left out of the wheel (setup.py package_data): {sorted(missing)}"


def test_the_kernel_build_finds_its_headers_in_the_wheel(wheel):
    names = set(wheel.namelist())
    kernels = "pdserve/common/engine/kernels"
    headers = {n for n in names if n.startswith(kernels) and n.endswith(".h")}
    assert {f"{kernels}/vec.h", f"{kernels}/panels.h", f"{kernels}/row_kernel.h"} <= headers


def test_the_license_is_an_spdx_expression(wheel):
    # The table form (`license = {text = ...}`) is deprecated in setuptools and stops building in 2027.
    (metadata,) = (n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in wheel.read(metadata).decode().splitlines()
