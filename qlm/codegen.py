"""Generates the Python stubs in qlm/v1/ from protos/qlm/v1/*.proto with grpcio-tools.

The stubs are committed so that the services run without grpcio-tools; a test regenerates them
into a temporary folder and fails when they differ from what is committed.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / "qlm" / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes qlm/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py below out_dir; returns them.

    protoc runs in a process of its own: its native protobuf runtime aborts the process when
    another one (OR-Tools', in the planner) is loaded beside it."""
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("grpcio-tools is not installed (the `test` extra)")
    include = pathlib.Path(next(iter(spec.submodule_search_locations))) / "_proto"
    args = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}\n{result.stderr}")
    return sorted((out_dir / "qlm" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    written = generate(ROOT)
    print("\n".join(str(p.relative_to(ROOT)) for p in written))
    sys.exit(0)
