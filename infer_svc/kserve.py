"""The Open Inference Protocol (KServe v2) servicer, inference.GRPCInferenceService: translation only.

What tritonclient and other KServe v2 clients call over gRPC. What a model
looks like on the protocol, and what each call checks and answers, is
infer_svc.oip's, shared with the HTTP/REST transport (infer_svc.http).
Outputs are answered as raw_output_contents, one entry per output, as
Triton does. Status codes are those of infer_svc.servicer (STATUS_BY_ERROR).
"""

from __future__ import annotations

import math

import numpy as np

from infer_svc import oip
from infer_svc.metrics import observed
from infer_svc.predict import Predictor
from infer_svc.servicer import STATUS_BY_ERROR
from shared.rpc.convert import from_tensor
from shared.rpc.errors import translate_errors
from shared.rpc.stubs import grpc_service_pb2 as pb
from shared.rpc.stubs import grpc_service_pb2_grpc
from shared.rpc.stubs.tandem_common_pb2 import Tensor

CONTENTS_FIELD = {"float32": "fp32_contents", "float64": "fp64_contents"}  # in InferTensorContents


def input_array(request: pb.ModelInferRequest) -> np.ndarray:
    """The request's one input tensor as an array, from raw_input_contents or typed contents."""
    oip.check_input_count(len(request.inputs))
    first = request.inputs[0]
    shape = list(first.shape)
    dtype = oip.input_dtype(first.name, first.datatype, shape)
    contents_field = CONTENTS_FIELD[dtype]
    if bool(request.raw_input_contents) == first.HasField("contents"):
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
    values = np.asarray(getattr(first.contents, contents_field), dtype=dtype)
    if values.size != math.prod(shape):
        raise ValueError(
            f"inputs[0].contents.{contents_field} holds {values.size} values; "
            f"shape {shape} needs {math.prod(shape)}"
        )
    return values.reshape(shape)


def tensor_metadata(tensors: list[oip.TensorMetadata]):
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in tensors
    ]


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
        return pb.ModelReadyResponse(ready=oip.model_ready(self.registry, request.name, request.version))

    def ServerMetadata(self, request, context):
        server = oip.server_metadata()
        return pb.ServerMetadataResponse(
            name=server.name, version=server.version, extensions=server.extensions
        )

    @translate_errors(STATUS_BY_ERROR)
    def ModelMetadata(self, request, context):
        model = oip.model_metadata(self.registry, request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=model.versions,
            platform=model.platform,
            inputs=tensor_metadata(model.inputs),
            outputs=tensor_metadata(model.outputs),
        )

    @observed("model_version")
    @translate_errors(STATUS_BY_ERROR)
    def ModelInfer(self, request, context):
        outputs = oip.requested_outputs([output.name for output in request.outputs])
        answer = oip.infer(
            self.predictor, request.model_name, request.model_version, input_array(request), outputs
        )
        response = pb.ModelInferResponse(
            model_name=answer.model_name, model_version=answer.model_version, id=request.id
        )
        for output in answer.outputs:
            response.outputs.add(name=output.name, datatype=output.datatype, shape=output.array.shape)
            response.raw_output_contents.append(output.array.tobytes())
        return response
