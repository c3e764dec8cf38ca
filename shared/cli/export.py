"""`tandem export CHECKPOINT --onnx FILE`: a saved model as an ONNX file (shared.export.onnx),
for ONNX Runtime or Triton's onnxruntime backend. Needs onnx: tandem[onnx]."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import TYPE_CHECKING

from shared.cli.errors import report
from shared.cli.models import read_checkpoint

if TYPE_CHECKING:
    from onnx import ValueInfoProto


def add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="write a saved model as an ONNX file, for ONNX Runtime or Triton (needs onnx: tandem[onnx])",
        allow_abbrev=False,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="the model file (a .safetensors checkpoint)")
    parser.add_argument(
        "--onnx",
        required=True,
        metavar="FILE",
        help="the ONNX file to write (into an existing directory; the file appears whole or not at all)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        metavar="N",
        help="the ONNX opset to write (default: 17, or the newest the installed onnxruntime knows if older)",
    )
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int | None:
    """Export the checkpoint; an existing FILE is refused without --force before any work
    (one that appears meanwhile is replaced, whole: save_onnx writes atomically)."""
    try:
        from shared.export.onnx import save_onnx  # an optional extra: onnx
    except ImportError as error:
        return report(str(error))
    out = Path(args.onnx)
    if out.exists() and not args.force:
        raise FileExistsError(errno.EEXIST, "exists already (--force replaces it)", str(out))
    proto = save_onnx(read_checkpoint(args.checkpoint), out, opset=args.opset)
    opset = proto.opset_import[0].version
    print(f"wrote {out} ({out.stat().st_size:,} bytes, opset {opset}, IR {proto.ir_version})")
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for value in values:
            print(f"  {kind:<6}  {value_text(value)}")
    return None


def value_text(value: ValueInfoProto) -> str:
    """`probabilities  float32  [batch, 10]`: an ONNX graph input's or output's name, type and shape."""
    from onnx import helper

    tensor = value.type.tensor_type
    dims = [dim.dim_param or str(dim.dim_value) for dim in tensor.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return f"{value.name:<13}  {dtype:<7}  [{', '.join(dims)}]"
