"""Regenerate (or check) the committed Python stubs of protos/pdserve/v1.

    python protos/generate.py          # rewrite *_pb2.py, *_pb2_grpc.py, *_pb2.pyi
    python protos/generate.py --check  # exit 1 and name the stale files

Stubs are committed so that installing pdserve needs no protoc step; the
check (run by tests/unit/test_protos.py) keeps them in step with the .proto
files. Generation runs grpcio-tools' bundled protoc with `protos/` as the
include root, so the generated imports read `from pdserve.v1 import ...`,
which setup.py maps to this directory.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "pdserve" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")

# Lines that only record the toolchain's version. They are ignored by
# --check so that a patch release of grpcio-tools/protobuf on another machine
# does not flag unchanged protos as stale; the code itself must still match.
_VERSION_STAMPS = re.compile(
    rb"^(# Protobuf Python Version: .*"
    rb"|GRPC_GENERATED_VERSION = .*"
    rb"|\s*\d+,\s*$"  # major/minor/patch arguments of ValidateProtobufRuntimeVersion
    rb")$",
    re.MULTILINE,
)


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.glob("*.proto"))


def generated_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def generate(out_root: Path) -> Path:
    """Run protoc into out_root; returns the directory holding the stubs."""
    import grpc_tools  # the well-known types (google/protobuf/*.proto) ship inside

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    if not protos:
        raise SystemExit(f"no .proto files in {PACKAGE_DIR}")
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    # Relative proto paths keep absolute paths of this machine out of the output.
    subprocess.run(command, cwd=PROTO_ROOT, check=True)
    return out_root / "pdserve" / "v1"


def _normalized(path: Path) -> bytes:
    return _VERSION_STAMPS.sub(b"", path.read_bytes())


def stale_files(fresh_dir: Path) -> list[str]:
    """Committed stubs that differ from, lack, or outlive the fresh ones."""
    fresh, committed = generated_files(fresh_dir), generated_files(PACKAGE_DIR)
    stale = set(fresh ^ committed)
    for name in fresh & committed:
        a, b = fresh_dir / name, PACKAGE_DIR / name
        if not filecmp.cmp(a, b, shallow=False) and _normalized(a) != _normalized(b):
            stale.add(name)
    return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="regenerate into a temp dir and diff against the committed stubs"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pdserve-protos-") as tmp:
        fresh_dir = generate(Path(tmp))
        if args.check:
            stale = stale_files(fresh_dir)
            if stale:
                print("stale generated files (run python protos/generate.py):", file=sys.stderr)
                for name in stale:
                    print(f"  {PACKAGE_DIR / name}", file=sys.stderr)
                return 1
            print(f"{len(generated_files(fresh_dir))} generated files are current")
            return 0
        for name in generated_files(PACKAGE_DIR) - generated_files(fresh_dir):
            (PACKAGE_DIR / name).unlink()  # stubs of a deleted .proto
        for name in sorted(generated_files(fresh_dir)):
            shutil.copyfile(fresh_dir / name, PACKAGE_DIR / name)
            print(f"wrote {PACKAGE_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
