"""Models from a declarative spec: plain JSON-serialisable data.

A spec is a dict with the per-sample input shape and a list of layers:

    {"input_shape": [1, 8, 8],
     "layers": [{"type": "conv2d", "filters": 32, "kernel_size": 3, "padding": "same"},
                {"type": "relu"},
                {"type": "maxpool2d", "size": 2},
                {"type": "flatten"},
                {"type": "dense", "units": 10}]}

Layer types and their options (defaults in brackets; `shared.nn.layers`
gives each one's exact forward in training and in evaluation):

    dense           units, init ["he"], init_std [0.01]
    conv2d          filters, kernel_size [3], stride [1], padding ["valid"], init, init_std
    maxpool2d       size [2], stride [= size], padding ["valid"]
    avgpool2d       size [2], stride [= size], padding ["valid"]
    global_avgpool  (C, H, W) -> (C,): each channel's mean over its pixels
    flatten         (...) -> (features,)
    batchnorm       momentum [0.1] in (0, 1], eps [1e-5] > 0 (PyTorch's); flat or image inputs
    dropout         rate in [0, 1), required; the identity at evaluation
    relu, sigmoid, tanh
    leaky_relu      negative_slope [0.01] in [0, 1)
    gelu            approximate ["none"] (erf) or "tanh"

The last layer's output is one logit per class; softmax lives in the loss
and in `Model.predict_proba`. Building runs shape inference through every
layer, so a spec that cannot work is refused before any training, with one
error naming the layer's index, its type and the shapes involved. The
README documents every layer type and option.
"""

from __future__ import annotations

import functools
import inspect
import json

import numpy as np

from shared.dtypes import as_model_dtype
from shared.nn.geometry import SpecError
from shared.nn.layers import LAYER_TYPES
from shared.nn.model import Model

SPEC_KEYS = {"input_shape", "layers"}


@functools.cache  # per layer class: inspect.signature took most of a small model's build (and load)
def _layer_options(kind: str) -> tuple[frozenset[str], frozenset[str]]:
    """(all option names, required option names) from the constructor of layer type `kind`."""
    params = list(inspect.signature(LAYER_TYPES[kind].__init__).parameters.values())[2:]  # self, input_shape
    return (
        frozenset(p.name for p in params),
        frozenset(p.name for p in params if p.default is inspect.Parameter.empty),
    )


def _check_input_shape(value) -> tuple[int, ...]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) not in (1, 3)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise SpecError(
            f"input_shape must be [features] or [channels, height, width] of positive ints, got {value!r}"
        )
    return tuple(value)


def build_model(spec: dict, dtype=np.float32) -> Model:
    """Check `spec` and build its (uninitialised) model; raise SpecError if it cannot work."""
    if not isinstance(spec, dict):
        raise SpecError(f"a spec must be an object with {sorted(SPEC_KEYS)}, got {type(spec).__name__}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise SpecError(f"unknown spec keys {sorted(unknown)}; expected {sorted(SPEC_KEYS)}")
    shape = _check_input_shape(spec.get("input_shape"))
    entries = spec.get("layers")
    if not isinstance(entries, list) or not entries:
        raise SpecError("layers must be a non-empty list")

    layers = []
    for index, entry in enumerate(entries):
        layer = _build_layer(index, entry, shape)
        layers.append(layer)
        shape = layer.output_shape

    if len(shape) != 1 or shape[0] < 2:
        raise SpecError(
            f"the last layer ({len(entries) - 1}, {layers[-1].type_name}) outputs shape {shape}; "
            "a classifier ends in one logit per class, e.g. a dense layer with units >= 2"
        )
    normalised = {"input_shape": list(layers[0].input_shape), "layers": [layer.config() for layer in layers]}
    return Model(normalised, layers, dtype=as_model_dtype(dtype))


def _build_layer(index: int, entry, input_shape: tuple[int, ...]):
    where = f"layer {index}"
    if not isinstance(entry, dict) or "type" not in entry:
        raise SpecError(f"{where}: each layer must be an object with a 'type', got {entry!r}")
    kind = entry["type"]
    where = f"layer {index} ({kind})"
    if not isinstance(kind, str) or kind not in LAYER_TYPES:
        raise SpecError(f"{where}: unknown layer type; known types are {sorted(LAYER_TYPES)}")
    cls = LAYER_TYPES[kind]
    options = {k: v for k, v in entry.items() if k != "type"}
    allowed, required = _layer_options(kind)
    unknown, missing = set(options) - allowed, required - set(options)
    if unknown:
        raise SpecError(f"{where}: unknown options {sorted(unknown)}; allowed: {sorted(allowed)}")
    if missing:
        raise SpecError(f"{where}: missing required options {sorted(missing)}")
    try:
        return cls(input_shape, **options)
    except SpecError as error:
        raise SpecError(f"{where} with input shape {input_shape}: {error}") from None


def spec_to_json(spec: dict) -> str:
    """The canonical JSON text of a spec (sorted keys, no spaces): stable across runs."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))
