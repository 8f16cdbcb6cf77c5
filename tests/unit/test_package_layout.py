"""The import name `pdserve` is the folder services/ (and pdserve.v1 is protos/pdserve/v1):
a build lays the two out as one package that static tools can read."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_build_lays_services_and_protos_out_as_one_typed_pdserve_package(tmp_path):
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    package = tmp_path / "pdserve"
    assert (package / "router" / "router.py").read_bytes() == (REPO / "services/router/router.py").read_bytes()
    assert (package / "v1" / "decode_pb2.pyi").is_file()
    # PEP 561 markers: without them mypy treats an installed pdserve as untyped.
    assert (package / "py.typed").is_file() and (package / "v1" / "py.typed").is_file()
    assert not (tmp_path / "services").exists()
