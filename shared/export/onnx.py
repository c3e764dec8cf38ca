"""A Tandem model as an ONNX model, for ONNX Runtime and Triton's onnxruntime backend.

    proto = to_onnx(model, name="digits")        # an onnx.ModelProto, checked
    save_onnx(checkpoint, "digits.onnx")         # a model or a checkpoint, written atomically

The graph answers as Tandem's Open Inference Protocol endpoint does (infer_svc.kserve):

    input          "input"          the model's dtype   [batch, *input_shape]
    output         "probabilities"  float32             [batch, classes]  Softmax(axis=1) of the logits
    output         "classes"        int64               [batch]           ArgMax(axis=1) of the probabilities

"batch" is a dynamic dimension (dim_param): any number of rows per call.
Each layer becomes ONNX nodes by the builder EXPORTERS holds for its spec type
name (a new layer type adds one entry there); its parameters become
initializers named as Tandem names them ("layers.0.W").

Versions. The default opset is DEFAULT_OPSET, 17 (ONNX 1.12, 2022): old
enough that the ONNX Runtime builds in Triton releases of the last years run
it, new enough for every operator here in its current form; it is capped at
the newest opset the installed onnxruntime knows, should that be older. An
explicit opset may be any from MIN_OPSET, 13 (where Softmax took its per-axis
meaning), to the newest that both the installed onnx and, if installed,
onnxruntime know (`newest_opset`). The IR version is the oldest that the
opset allows (onnx.helper.find_min_ir_version_for), not onnx's newest, which
an older runtime refuses to load: IR 8 for opset 17.

Float64 models keep float64 arithmetic (input, weights and every node but the
final Cast of the probabilities to float32), which ONNX Runtime's CPU
provider runs for Gemm, pooling by maximum, the activations and Softmax; it
has no float64 Conv or AveragePool, so a float64 model with those layers is
refused (ExportError) rather than written as a file that will not load.

onnx is an optional extra: without it, importing this module raises an
ImportError that says how to install it.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.checkpoints.checkpoint import Checkpoint, CheckpointMeta
from shared.nn import Model, spec_to_json
from shared.nn.geometry import Window
from shared.nn.layers import AvgPool2D, Conv2D, Dense, Layer, MaxPool2D
from shared.version import tandem_version

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as error:
    raise ImportError(
        f"ONNX export needs the onnx package ({error}): pip install -e '.[onnx]' from the checkout"
    ) from error

DEFAULT_OPSET = 17
MIN_OPSET = 13
INPUT, PROBABILITIES, CLASSES = "input", "probabilities", "classes"
BATCH = "batch"  # the dynamic first dimension's name
ELEMENT_TYPES = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}


class ExportError(ValueError):
    """A model this exporter cannot write: a layer type without a builder, or settings that
    ONNX or ONNX Runtime cannot run as Tandem computes them."""


# ---------------------------------------------------------------- versions


def newest_opset() -> int:
    """The newest opset of the default domain that onnx and, if installed, onnxruntime both know."""
    newest = onnx.defs.onnx_opset_version()
    if importlib.util.find_spec("onnxruntime") is None:
        return newest
    return min(newest, _onnxruntime_newest_opset())


def _onnxruntime_newest_opset() -> int:
    """onnxruntime publishes no "newest opset"; it registers the ONNX operator schemas it was
    built with, and the newest of their since_versions is the newest opset it knows."""
    from onnxruntime.capi import onnxruntime_pybind11_state as onnxruntime_c

    schemas = onnxruntime_c.get_all_operator_schema()
    return max(schema.since_version for schema in schemas if schema.domain in ("", "ai.onnx"))


def _checked_opset(opset: int | None) -> int:
    """`opset`, or the default (capped at `newest_opset`), if it is one the export supports."""
    newest = newest_opset()
    if opset is None:
        opset = min(DEFAULT_OPSET, newest)
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset must be an int from {MIN_OPSET} to {newest} (the newest that the installed onnx, "
            f"and onnxruntime if installed, know), got {opset!r}"
        )
    return opset


# ---------------------------------------------------------------- the graph being built


@dataclass
class Graph:
    """The nodes and initializers of a graph in the making, in the model's dtype."""

    dtype: np.dtype
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def parameters(self, layer: Layer, name: str) -> list[str]:
        """Add the layer's parameters as initializers ("layers.0.W", "layers.0.b"); return their names,
        in the layer's order (W, then b: the weight and bias inputs of Gemm and Conv)."""
        names = []
        for key in layer.param_shapes():
            array = np.asarray(layer.params[key], self.dtype)
            self.initializers.append(numpy_helper.from_array(array, f"{name}.{key}"))
            names.append(f"{name}.{key}")
        return names

    def node(self, op_type: str, inputs: list[str], output: str, **attributes) -> str:
        """Add a node computing `output` (also its name); return the output's name."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output


# ---------------------------------------------------------------- one builder per layer type
#
# A builder gets the layer, its input's name, the graph and the layer's name ("layers.3"),
# adds the layer's nodes, and returns the name of its output.


def _dense(layer: Dense, x: str, graph: Graph, name: str) -> str:
    """y = x W + b: Gemm's A B + C, with W stored (in, out) as B needs it."""
    return graph.node("Gemm", [x, *graph.parameters(layer, name)], f"{name}.dense")


def _pads(window: Window) -> list[int]:
    """The padding shared.nn.geometry resolved for `window`, in ONNX's order
    [top, left, bottom, right] (every axis's start, then every axis's end).

    Explicit pads rather than auto_pad: "same" puts an odd padding's extra
    row and column at the bottom and right, which SAME_UPPER also does, but an
    integer padding has no auto_pad, and explicit numbers say in the file
    exactly what the NumPy model computes, whatever a runtime makes of auto_pad.
    """
    return [window.pad_top, window.pad_left, window.pad_bottom, window.pad_right]


def _window_attributes(window: Window) -> dict:
    return {"kernel_shape": list(window.kernel), "strides": list(window.stride), "pads": _pads(window)}


def _conv2d(layer: Conv2D, x: str, graph: Graph, name: str) -> str:
    """Cross-correlation with W as (filters, channels, kh, kw): ONNX Conv's own layout;
    padding reads as zeros in both."""
    return graph.node(
        "Conv", [x, *graph.parameters(layer, name)], f"{name}.conv2d", **_window_attributes(layer.window)
    )


def _pool_attributes(layer: MaxPool2D | AvgPool2D) -> dict:
    """Window attributes of a pooling layer, which ONNX Runtime runs only with padding
    smaller than the window (so that no window holds padding alone: Tandem's maximum of such a
    window would be -inf, its average 0/0). ceil_mode=0: output sizes round down, as Tandem's do.
    """
    window, pads = layer.window, _pads(layer.window)
    if any(pad >= size for pad, size in zip(pads, [*window.kernel, *window.kernel], strict=True)):
        raise ExportError(
            f"padding {window.padding!r} (top, left, bottom, right: {pads}) is not smaller "
            f"than the {window.kernel[0]}x{window.kernel[1]} window; ONNX Runtime pools only with "
            "padding smaller than the window"
        )
    return {**_window_attributes(window), "ceil_mode": 0}


def _maxpool2d(layer: MaxPool2D, x: str, graph: Graph, name: str) -> str:
    """ONNX MaxPool, like Tandem's, takes the maximum of each window's real inputs: padding never wins."""
    return graph.node("MaxPool", [x], f"{name}.maxpool2d", **_pool_attributes(layer))


def _avgpool2d(layer: AvgPool2D, x: str, graph: Graph, name: str) -> str:
    """Tandem divides each window by its real (unpadded) inputs: count_include_pad=0."""
    return graph.node("AveragePool", [x], f"{name}.avgpool2d", **_pool_attributes(layer), count_include_pad=0)


def _flatten(layer: Layer, x: str, graph: Graph, name: str) -> str:
    """(N, C, H, W) to (N, C*H*W) in C order, as numpy's reshape of the (N, C, H, W) array does."""
    return graph.node("Flatten", [x], f"{name}.flatten", axis=1)


def _elementwise(op_type: str) -> Callable[[Layer, str, Graph, str], str]:
    """The builder of an activation that is one ONNX operator."""

    def build(layer: Layer, x: str, graph: Graph, name: str) -> str:
        return graph.node(op_type, [x], f"{name}.{layer.type_name}")

    return build


@dataclass(frozen=True)
class LayerExporter:
    """How one layer type becomes ONNX: its builder, and whether ONNX Runtime's CPU provider
    runs those nodes in float64 too."""

    build: Callable[..., str]  # (layer, input name, graph, layer name) -> output name
    runs_in_float64: bool = True


# spec type name -> its exporter; tests/test_onnx_export.py checks that every LAYER_TYPES entry has one.
EXPORTERS: dict[str, LayerExporter] = {
    "dense": LayerExporter(_dense),
    "conv2d": LayerExporter(_conv2d, runs_in_float64=False),  # onnxruntime's CPU Conv: float only
    "maxpool2d": LayerExporter(_maxpool2d),
    "avgpool2d": LayerExporter(_avgpool2d, runs_in_float64=False),  # its CPU AveragePool: float only
    "flatten": LayerExporter(_flatten),
    "relu": LayerExporter(_elementwise("Relu")),
    "sigmoid": LayerExporter(_elementwise("Sigmoid")),
    "tanh": LayerExporter(_elementwise("Tanh")),
}


# ---------------------------------------------------------------- the whole model


def to_onnx(
    model: Model, *, opset: int | None = None, name: str = "tandem", metadata: dict[str, str] | None = None
) -> onnx.ModelProto:
    """`model` as an ONNX model (see the module docstring), checked by onnx.checker (full_check).

    `name` names the graph; `metadata` adds to the metadata_props, which always
    hold the spec and the dtype. Raises ExportError for a layer or an opset
    that cannot be exported.
    """
    opset = _checked_opset(opset)
    graph = Graph(model.dtype)
    x = INPUT
    for index, layer in enumerate(model.layers):
        x = _layer_nodes(index, layer, x, graph)
    _answer_nodes(x, graph)

    element_type = ELEMENT_TYPES[model.dtype.name]
    proto = helper.make_model(
        helper.make_graph(
            graph.nodes,
            name,
            [helper.make_tensor_value_info(INPUT, element_type, [BATCH, *model.input_shape])],
            [
                helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [BATCH, model.num_classes]),
                helper.make_tensor_value_info(CLASSES, TensorProto.INT64, [BATCH]),
            ],
            graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="tandem",
        producer_version=tandem_version(),
    )
    proto.ir_version = helper.find_min_ir_version_for(list(proto.opset_import))
    helper.set_model_props(
        proto, {"tandem.spec": spec_to_json(model.spec), "tandem.dtype": model.dtype.name, **(metadata or {})}
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _layer_nodes(index: int, layer: Layer, x: str, graph: Graph) -> str:
    """Add layer `index`'s nodes after `x`; return its output's name."""
    where = f"layer {index} ({layer.type_name})"
    exporter = EXPORTERS.get(layer.type_name)
    if exporter is None:
        raise ExportError(f"{where}: no ONNX exporter for this layer type; exportable: {sorted(EXPORTERS)}")
    if graph.dtype == np.float64 and not exporter.runs_in_float64:
        raise ExportError(
            f"{where}: ONNX Runtime's CPU provider runs this layer in float32 only, and the model is "
            "float64; train it in float32 to export it (tandem train --dtype float32)"
        )
    try:
        return exporter.build(layer, x, graph, f"layers.{index}")
    except ExportError as error:
        raise ExportError(f"{where}: {error}") from None


def _answer_nodes(logits: str, graph: Graph) -> None:
    """The outputs Tandem's server answers with: float32 probabilities, and classes as the argmax
    of those float32 probabilities (as the server takes them), ties to the lower class."""
    if graph.dtype == np.float32:
        graph.node("Softmax", [logits], PROBABILITIES, axis=1)
    else:
        softmax = graph.node("Softmax", [logits], f"{PROBABILITIES}.{graph.dtype.name}", axis=1)
        graph.node("Cast", [softmax], PROBABILITIES, to=TensorProto.FLOAT)
    graph.node("ArgMax", [PROBABILITIES], CLASSES, axis=1, keepdims=0)


def checkpoint_metadata(meta: CheckpointMeta) -> dict[str, str]:
    """The metadata_props a checkpoint adds: its model name, version and weights' checksum."""
    properties = {"tandem.model_name": meta.model_name, "tandem.version": str(meta.version)}
    for checksum in ("xxh3_128", "sha256"):  # format 2's, or format 1's
        if getattr(meta, checksum):
            properties[f"tandem.{checksum}"] = getattr(meta, checksum)
    return properties


# ---------------------------------------------------------------- writing the file


def save_onnx(
    model: Model | Checkpoint, path: str | os.PathLike, *, opset: int | None = None
) -> onnx.ModelProto:
    """Export `model` (a checkpoint's: with its name, version and checksum) to `path`; return it.

    The file is written to a temporary file in the same directory, then moved
    into place (os.replace): a failed export leaves no half-written file, and
    a file already at `path` is replaced whole or not at all.
    """
    path = Path(path)
    # Checked first, to name `path` (os.replace would name the temporary file) before any work.
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    if isinstance(model, Checkpoint):
        meta = model.meta
        proto = to_onnx(model.model, opset=opset, name=meta.model_name, metadata=checkpoint_metadata(meta))
    else:
        proto = to_onnx(model, opset=opset)
    _write_atomically(path, proto.SerializeToString())
    return proto


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a new file beside `path`, flush it to disk, then rename it to `path`.

    The temporary file is created as open() creates files (mode 0o666 less the
    umask), not 0o600 as tempfile's are, so that the result reads like any file written.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
