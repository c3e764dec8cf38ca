"""The Open Inference Protocol (KServe v2), whatever the transport: what a model looks like on it,
and what each of its calls checks and answers.

Both transports answer through these functions, so that they validate and
answer alike: gRPC (infer_svc.kserve) and HTTP/REST (infer_svc.http). A
model is a Tandem model name, a version its checkpoint version as a decimal
string, written the one way the server writes it ("7", not "07" or "+7";
"" = the version the server's policy serves). Each model has one input,
"input" (FP32 or FP64, shape [N, *input_shape]), and two outputs,
"probabilities" (FP32 [N, classes]) and "classes" (INT64 [N], the most
probable class). Errors are the domain's (infer_svc.predict), ValueError
naming the request's field for what the caller got wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from infer_svc.predict import Predictor
from infer_svc.registry import Registry
from shared.version import tandem_version

SERVER_NAME = "tandem"
PLATFORM = "tandem_numpy"
# The binary tensor data extension: tensors as raw bytes after the JSON of an HTTP request or
# response (infer_svc.http_tensors). gRPC carries raw bytes natively; the server has it either way.
EXTENSIONS = ("binary_tensor_data",)
INPUT = "input"
INPUT_DTYPES = {"FP32": "float32", "FP64": "float64"}  # input datatypes accepted: the numpy dtype of each
DATATYPE_OF = {dtype: datatype for datatype, dtype in INPUT_DTYPES.items()}  # a model's, as its input's
# Outputs, in the order answered when the request names none: datatype and wire dtype.
OUTPUTS = {"probabilities": ("FP32", "<f4"), "classes": ("INT64", "<i8")}
VERSION = re.compile("[1-9][0-9]*")  # [0-9], not \d, which matches every script's digits
MAX_VERSION = 2**63 - 1  # int64, the version's type in Tandem's own API
# Far more than any model's samples and a batch need, and few enough that the product of a
# shape's entries (each up to 2**63) is cheap to compute: a shape of a million huge entries,
# which a request of a few megabytes can declare, would take seconds to multiply out.
MAX_DIMENSIONS = 32


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]  # -1: a dimension of any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    array: np.ndarray  # in the wire dtype, little-endian


@dataclass(frozen=True)
class Answer:
    model_name: str
    model_version: str
    outputs: list[Output]


def server_metadata() -> ServerMetadata:
    return ServerMetadata(SERVER_NAME, tandem_version(), list(EXTENSIONS))


def requested_version(text: str, field: str) -> int | None:
    """The request's `field` (model_version or version) as a version number; None for "" (the policy's).

    Only the canonical spelling, as the server answers versions: ASCII digits,
    no sign, space or leading zero, from 1 to int64's largest. (int() alone
    would take "+1", " 1" and other scripts' digits such as "١".) A string
    longer than the largest version is refused before int() reads it.
    """
    if not text:
        return None
    if len(text) > len(str(MAX_VERSION)) or not VERSION.fullmatch(text) or int(text) > MAX_VERSION:
        raise ValueError(
            f"{field} must be empty (the served version) or a version number: ASCII "
            f"digits from 1 to {MAX_VERSION} without sign, spaces or leading zeros; "
            f"got {text!r:.80}"
        )
    return int(text)


def check_input_count(count: int) -> None:
    if count != 1:
        raise ValueError(f"inputs: the model takes one input, {INPUT!r}; got {count}")


def input_dtype(name: str, datatype: str, shape: list[int]) -> str:
    """The numpy dtype of the request's one input, once its name, datatype and shape are checked
    (after check_input_count)."""
    if name != INPUT:
        raise ValueError(f"inputs[0].name must be {INPUT!r}, the model's input; got {name!r:.80}")
    if datatype not in INPUT_DTYPES:
        raise ValueError(
            f"inputs[0].datatype {datatype!r:.80} is not accepted; use one of {', '.join(INPUT_DTYPES)}"
        )
    if len(shape) > MAX_DIMENSIONS:
        raise ValueError(
            f"inputs[0].shape has {len(shape)} dimensions; at most {MAX_DIMENSIONS} are accepted"
        )
    if any(d < 0 for d in shape):
        raise ValueError(f"inputs[0].shape must have no negative dimension; got {shape}")
    return INPUT_DTYPES[datatype]


def requested_outputs(names: list[str]) -> list[str]:
    """The outputs to answer, in the order asked (all of them, in OUTPUTS' order, for none)."""
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise ValueError(
            f"outputs: no output named {', '.join(repr(name)[:80] for name in unknown)}; "
            f"the model's outputs are {', '.join(OUTPUTS)}"
        )
    return names or list(OUTPUTS)


def model_ready(registry: Registry, name: str, version: str) -> bool:
    """Whether a version of the model serves here ("") or the version asked for can serve.

    A version can serve when it is loaded, or in the store and not known to
    fail verification (Registry.versions).
    """
    number = requested_version(version, "version")
    if not registry.serves(name):
        return False
    if number is None:
        return name in registry.served()
    return number in [meta["version"] for meta in registry.versions(name)]


def model_metadata(registry: Registry, name: str, version: str) -> ModelMetadata:
    servable = registry.get(name, requested_version(version, "version"))
    return ModelMetadata(
        name=servable.name,
        versions=[str(meta["version"]) for meta in registry.versions(servable.name)],
        platform=PLATFORM,
        inputs=[TensorMetadata(INPUT, DATATYPE_OF[servable.model.dtype.name], [-1, *servable.input_shape])],
        outputs=[
            TensorMetadata("probabilities", "FP32", [-1, servable.num_classes]),
            TensorMetadata("classes", "INT64", [-1]),
        ],
    )


def infer(
    predictor: Predictor, model_name: str, version: str, inputs: np.ndarray, outputs: list[str]
) -> Answer:
    """The model's answer to `inputs`, as the outputs named (checked by requested_outputs)."""
    prediction = predictor.predict(
        model_name, inputs, requested_version(version, "model_version"), field="inputs[0]"
    )
    arrays = {"probabilities": prediction.probabilities, "classes": prediction.classes}
    return Answer(
        prediction.model_name,
        str(prediction.version),
        [
            Output(name, OUTPUTS[name][0], arrays[name].astype(OUTPUTS[name][1], copy=False))
            for name in outputs
        ],
    )
