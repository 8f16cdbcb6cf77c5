"""The import name `pdserve` is the folder services/ (and pdserve.v1 is protos/pdserve/v1):
a build lays the two out as one package that static tools can read, carrying every file the
package needs at run time.

The README's commands install editable, from the source tree, so a file left out of setup.py's
package_data shows only in a wheel: a container image (`pip install .`) or a user's
`pip install "pdserve[worker]"`. The kernels' headers were such files: without them the C++
kernels did not build and workers ran on the torch-only path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Where each source folder lands in the wheel (setup.py's package_dir).
TREES = {REPO / "services": "pdserve", REPO / "protos" / "pdserve" / "v1": "pdserve/v1"}
BUILT = ("__pycache__", ".pytest_cache", "*.pyc", "*.so")


def package_files() -> set[str]:
    """Every file of the source trees, named as the wheel names it (build outputs left out)."""
    names = set()
    for tree, prefix in TREES.items():
        for path in tree.rglob("*"):
            rel = path.relative_to(tree)
            if path.is_file() and not any(rel.match(p) or p in rel.parts for p in BUILT):
                names.add(f"{prefix}/{rel.as_posix()}")
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # From a copy of the sources: setuptools reuses a tree's build/ folder, whose files an earlier
    # build may have put there. No build isolation: the venv's setuptools, and no index needed.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for tree in ("services", "protos"):
        shutil.copytree(REPO / tree, src / tree, ignore=shutil.ignore_patterns(*BUILT))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (built,) = out.glob("pdserve-*.whl")
    return zipfile.ZipFile(built)


def test_a_build_lays_services_and_protos_out_as_one_typed_pdserve_package(wheel):
    names = set(wheel.namelist())
    assert wheel.read("pdserve/router/router.py") == (REPO / "services/router/router.py").read_bytes()
    assert "pdserve/v1/decode_pb2.pyi" in names
    # PEP 561 markers: without them mypy treats an installed pdserve as untyped.
    assert {"pdserve/py.typed", "pdserve/v1/py.typed"} <= names
    assert not any(n.startswith(("services/", "protos/")) for n in names)


def test_the_wheel_carries_every_file_of_the_package(wheel):
    # The generated stubs and .proto sources, the kernels' .cpp and .h, py.typed.
    missing = package_files() - set(wheel.namelist())
    assert not missing, f"left out of the wheel (setup.py package_data): {sorted(missing)}"
    kernels = "pdserve/common/engine/kernels"
    assert {f"{kernels}/vec.h", f"{kernels}/linear.cpp"} <= set(wheel.namelist())  # the check saw them


def test_the_license_is_an_spdx_expression(wheel):
    # The table form (`license = {text = ...}`) is deprecated in setuptools and stops building in 2027.
    (metadata,) = (n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in wheel.read(metadata).decode().splitlines()
