"""Generate the Python gRPC stubs in shared/rpc/stubs/ from proto/*.proto (`make protos`).

    python scripts/gen_protos.py [--out DIR]

Runs grpcio-tools' bundled protoc with -I proto and the plugins for messages
(*_pb2.py), services (*_pb2_grpc.py) and their typing stubs (mypy-protobuf:
*_pb2.pyi, *_pb2_grpc.pyi), into shared/rpc/stubs/ or DIR. protoc writes imports
between the generated modules as top-level ones (`import tandem_common_pb2
as ...`), which only work with the output directory on sys.path; they are
rewritten to package-relative ones (`from . import tandem_common_pb2 as
...`) so the stubs live inside the `shared.rpc.stubs` package.

The generated files are committed; tests/test_protos.py regenerates them into
a temporary directory and fails when they differ from the committed ones.
The output depends on the grpcio-tools and mypy-protobuf versions, which
pyproject.toml pins exactly for that reason.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "shared" / "rpc" / "stubs"
# What protoc and the plugins write for a proto file NAME.proto.
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
# Proto files whose messages go into a descriptor pool of their own instead of
# protobuf's default pool. grpc_service.proto is the Open Inference Protocol's
# file, and tritonclient ships its own build of a file of that name with the same
# symbols (tritonclient.grpc.service_pb2): in the default pool the second import of
# the two fails ("duplicate file name grpc_service.proto"), so a process could not
# hold both the inference service and a tritonclient client (an in-process test).
# A private pool changes nothing on the wire; it only means that code looking
# symbols up in the default pool (gRPC server reflection) must be given
# grpc_service_pb2.POOL for this file.
PRIVATE_POOL = {"grpc_service"}
DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL_LINES = (
    "# A descriptor pool of its own (scripts/gen_protos.py, PRIVATE_POOL): tritonclient's\n"
    "# build of grpc_service.proto can then be imported in the same process.\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    return sorted(proto_dir.glob("*.proto"))


def generated_names(proto_dir: Path = PROTO_DIR) -> list[str]:
    """The file names generation produces, for every proto file."""
    return sorted(p.stem + suffix for p in proto_files(proto_dir) for suffix in SUFFIXES)


def _plugin(name: str) -> str:
    """A protoc plugin installed beside this interpreter (mypy-protobuf's console scripts)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(
            f"{name} not found beside {sys.executable}: install the dev extra "
            f"(pip install -r requirements/dev.lock)"
        )
    return str(path)


def _relative_imports(text: str, modules: set[str]) -> str:
    """`import X_pb2 as Y` / `import X_pb2` -> `from . import X_pb2 ...` for our own modules."""

    def replace(match: re.Match) -> str:
        indent, module, alias = match.group(1), match.group(2), match.group(3) or ""
        if module not in modules:
            return match.group(0)
        return f"{indent}from . import {module}{alias}"

    return re.sub(
        r"^([ \t]*)import ([A-Za-z_][A-Za-z0-9_]*)((?: as [A-Za-z_][A-Za-z0-9_]*)?)$",
        replace,
        text,
        flags=re.MULTILINE,
    )


def _private_pool(text: str, name: str) -> str:
    """Make a generated NAME_pb2.py add its file to a pool of its own (see PRIVATE_POOL)."""
    if text.count(DEFAULT_POOL_LINE) != 1:
        raise SystemExit(
            f"{name}: expected one line starting {DEFAULT_POOL_LINE!r}; has protoc's output changed?"
        )
    return text.replace(DEFAULT_POOL_LINE, PRIVATE_POOL_LINES)


def generate(out_dir: Path = OUT_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Generate every stub into `out_dir`; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files(proto_dir)
    if not protos:
        raise SystemExit(f"no .proto files in {proto_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *(p.name for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see its messages above)")

    modules = {p.stem + "_pb2" for p in protos} | {p.stem + "_pb2_grpc" for p in protos}
    written = []
    for name in generated_names(proto_dir):
        path = out_dir / name
        if not path.exists():
            raise SystemExit(f"protoc did not write {path}")
        text = path.read_text()
        rewritten = _relative_imports(text, modules)
        if name.endswith("_pb2.py") and name.removesuffix("_pb2.py") in PRIVATE_POOL:
            rewritten = _private_pool(rewritten, name)
        if rewritten != text:
            path.write_text(rewritten)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=OUT_DIR, help=f"output directory (default: {OUT_DIR.relative_to(ROOT)})"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
