"""Package mapping only; everything else is in pyproject.toml.

The top-level layout is fixed by DESIGN.md (services/, protos/), while the
import name is `pdserve`: services/ becomes `pdserve`, and the generated
protobuf modules in protos/pdserve/v1 become `pdserve.v1`, which is the
import path grpcio-tools writes into the generated code.
"""

from setuptools import find_packages, setup

packages = ["pdserve"] + [f"pdserve.{p}" for p in find_packages("services")] + ["pdserve.v1"]
package_dir = {"pdserve": "services", "pdserve.v1": "protos/pdserve/v1"}
# py.typed (PEP 561) lets type checkers read the installed package; stubs and
# .proto sources travel with the generated modules; the engine's C++ kernels
# (sources and headers) are built from source on the machine that runs them.
package_data = {
    "pdserve": ["py.typed"],
    "pdserve.v1": ["*.pyi", "*.proto", "py.typed"],
    "pdserve.common.engine.kernels": ["*.cpp", "*.h"],
}

setup(packages=packages, package_dir=package_dir, package_data=package_data)
