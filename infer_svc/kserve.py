"""The Open Inference Protocol (KServe v2) servicer, inference.GRPCInferenceService: translation only.

What tritonclient and other KServe v2 clients call. A model is a Tandem
model name, a version its checkpoint version as a decimal string, written
the one way the server writes it ("7", not "07" or "+7"; "" = the version
the server's policy serves). Each model has one input, "input"
(FP32 or FP64, shape [N, *input_shape]), and two outputs, "probabilities"
(FP32 [N, classes]) and "classes" (INT64 [N], the most probable class),
answered as raw_output_contents, one entry per output, as Triton does.
Status codes are those of infer_svc.servicer (STATUS_BY_ERROR).
"""

from __future__ import annotations

import math
import re

import numpy as np

from infer_svc.metrics import observed
from infer_svc.predict import Predictor
from infer_svc.servicer import STATUS_BY_ERROR
from shared.rpc.convert import from_tensor
from shared.rpc.errors import translate_errors
from shared.rpc.stubs import grpc_service_pb2 as pb
from shared.rpc.stubs import grpc_service_pb2_grpc
from shared.rpc.stubs.tandem_common_pb2 import Tensor
from shared.version import tandem_version

SERVER_NAME = "tandem"
PLATFORM = "tandem_numpy"
INPUT = "input"
# Input datatypes accepted: the numpy dtype of each, and its field in InferTensorContents.
INPUT_DATATYPES = {"FP32": ("float32", "fp32_contents"), "FP64": ("float64", "fp64_contents")}
DATATYPE_OF = {"float32": "FP32", "float64": "FP64"}  # a model's dtype, as the input it expects
# Outputs, in the order answered when the request names none: datatype and wire dtype.
OUTPUTS = {"probabilities": ("FP32", "<f4"), "classes": ("INT64", "<i8")}
TensorMetadata = pb.ModelMetadataResponse.TensorMetadata
VERSION = re.compile("[1-9][0-9]*")  # [0-9], not \d, which matches every script's digits
MAX_VERSION = 2**63 - 1  # int64, the version's type in Tandem's own API


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


def input_array(request: pb.ModelInferRequest) -> np.ndarray:
    """The request's one input tensor as an array, from raw_input_contents or typed contents."""
    if len(request.inputs) != 1:
        raise ValueError(f"inputs: the model takes one input, {INPUT!r}; got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT:
        raise ValueError(f"inputs[0].name must be {INPUT!r}, the model's input; got {tensor.name!r}")
    if tensor.datatype not in INPUT_DATATYPES:
        raise ValueError(
            f"inputs[0].datatype {tensor.datatype!r} is not accepted; use one of {', '.join(INPUT_DATATYPES)}"
        )
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"inputs[0].shape must have no negative dimension; got {shape}")
    dtype, contents_field = INPUT_DATATYPES[tensor.datatype]
    if bool(request.raw_input_contents) == tensor.HasField("contents"):
        raise ValueError(
            f"inputs[0]: send its data in raw_input_contents or in "
            f"inputs[0].contents.{contents_field}, exactly one of them"
        )
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise ValueError(
                f"raw_input_contents must have one entry per input (1), got {len(request.raw_input_contents)}"
            )
        raw = Tensor(dtype=dtype, shape=shape, data=request.raw_input_contents[0])
        return from_tensor(raw, field="raw_input_contents[0]")
    values = np.asarray(getattr(tensor.contents, contents_field), dtype=dtype)
    if values.size != math.prod(shape):
        raise ValueError(
            f"inputs[0].contents.{contents_field} holds {values.size} values; "
            f"shape {shape} needs {math.prod(shape)}"
        )
    return values.reshape(shape)


class KServeServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.registry = predictor.registry

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.registry.ready)

    @translate_errors(STATUS_BY_ERROR)
    def ModelReady(self, request, context):
        """Ready when a version of the model serves here ("") or the version asked for can serve.

        A version can serve when it is loaded, or in the store and not known
        to fail verification (Registry.versions).
        """
        version = requested_version(request.version, "version")
        if not self.registry.serves(request.name):
            return pb.ModelReadyResponse(ready=False)
        if version is None:
            return pb.ModelReadyResponse(ready=request.name in self.registry.served())
        versions = [meta["version"] for meta in self.registry.versions(request.name)]
        return pb.ModelReadyResponse(ready=version in versions)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=tandem_version(), extensions=[])

    @translate_errors(STATUS_BY_ERROR)
    def ModelMetadata(self, request, context):
        servable = self.registry.get(request.name, requested_version(request.version, "version"))
        return pb.ModelMetadataResponse(
            name=servable.name,
            versions=[str(meta["version"]) for meta in self.registry.versions(servable.name)],
            platform=PLATFORM,
            inputs=[
                TensorMetadata(
                    name=INPUT,
                    datatype=DATATYPE_OF[servable.model.dtype.name],
                    shape=[-1, *servable.input_shape],
                )
            ],
            outputs=[
                TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, servable.num_classes]),
                TensorMetadata(name="classes", datatype="INT64", shape=[-1]),
            ],
        )

    @observed("model_version")
    @translate_errors(STATUS_BY_ERROR)
    def ModelInfer(self, request, context):
        requested = [output.name for output in request.outputs] or list(OUTPUTS)
        unknown = [name for name in requested if name not in OUTPUTS]
        if unknown:
            raise ValueError(
                f"outputs: no output named {', '.join(map(repr, unknown))}; "
                f"the model's outputs are {', '.join(OUTPUTS)}"
            )
        prediction = self.predictor.predict(
            request.model_name,
            input_array(request),
            requested_version(request.model_version, "model_version"),
            field="inputs[0]",
        )
        arrays = {"probabilities": prediction.probabilities, "classes": prediction.classes}
        response = pb.ModelInferResponse(
            model_name=prediction.model_name, model_version=str(prediction.version), id=request.id
        )
        for name in requested:
            datatype, wire_dtype = OUTPUTS[name]
            response.outputs.add(name=name, datatype=datatype, shape=arrays[name].shape)
            response.raw_output_contents.append(arrays[name].astype(wire_dtype, copy=False).tobytes())
        return response
