"""The Inference gRPC servicer (tandem.v1.Inference): translates between protobuf and the predictor.

Status codes (the Open Inference Protocol servicer, infer_svc.kserve, uses
the same table): ValueError (a bad batch, dtype, shape or field) ->
INVALID_ARGUMENT; LookupError (a model or version that is not in the
store, or a model not served here) -> NOT_FOUND; a full batching queue ->
RESOURCE_EXHAUSTED; a model that cannot be loaded now (Redis down, its
stored checkpoint fails verification) or a server shutting down ->
UNAVAILABLE. Messages come from the domain and name the field.
"""

from __future__ import annotations

from dataclasses import asdict

import grpc

from infer_svc.batching import BatcherStopped, QueueFull
from infer_svc.metrics import observed
from infer_svc.predict import Predictor
from infer_svc.registry import ModelUnavailable
from infer_svc.servable import Servable
from shared.checkpoints.checkpoint import CheckpointError
from shared.checkpoints.redis_client import StoreUnavailable
from shared.dtypes import MODEL_DTYPES
from shared.nn import spec_to_json
from shared.rpc.convert import checkpoint_info, from_tensor, to_tensor
from shared.rpc.errors import translate_errors
from shared.rpc.stubs import tandem_inference_pb2 as pb
from shared.rpc.stubs import tandem_inference_pb2_grpc

STATUS_BY_ERROR = [  # the first match wins
    (CheckpointError, grpc.StatusCode.UNAVAILABLE),  # a ValueError, but not the caller's
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (LookupError, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (BatcherStopped, grpc.StatusCode.UNAVAILABLE),
]


def model_metadata(servable: Servable, versions: list[dict]) -> pb.ModelMetadata:
    """`servable` described, with `versions` (Registry.versions) as the versions available."""
    meta = next((m for m in versions if m["version"] == servable.version), None) or asdict(servable.meta)
    newest = bool(versions) and versions[-1]["version"] == servable.version
    return pb.ModelMetadata(
        model_name=servable.name,
        version=servable.version,
        available_versions=[m["version"] for m in versions],
        input_shape=servable.input_shape,
        num_classes=servable.num_classes,
        dtype=servable.model.dtype.name,
        spec_json=spec_to_json(servable.model.spec),
        checkpoint=checkpoint_info(meta, latest=newest),
    )


class InferenceServicer(tandem_inference_pb2_grpc.InferenceServicer):
    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.registry = predictor.registry

    @observed("version")
    @translate_errors(STATUS_BY_ERROR)
    def Predict(self, request, context):
        inputs = from_tensor(request.inputs, allowed_dtypes=MODEL_DTYPES, field="inputs")
        version = request.version if request.HasField("version") else None
        prediction = self.predictor.predict(request.model_name, inputs, version)
        num_classes = prediction.probabilities.shape[1]
        if not 0 <= request.top_k <= num_classes:
            raise ValueError(
                f"top_k must be from 0 to the model's {num_classes} classes, got {request.top_k}"
            )
        response = pb.PredictResponse(
            model_name=prediction.model_name,
            version=prediction.version,
            probabilities=to_tensor(prediction.probabilities),
            classes=prediction.classes,
        )
        if request.top_k:
            classes, probabilities = prediction.top_k(request.top_k)
            response.top_k.extend(
                pb.TopK(classes=row_classes, probabilities=row_probabilities)
                for row_classes, row_probabilities in zip(classes, probabilities, strict=True)
            )
        return response

    @translate_errors(STATUS_BY_ERROR)
    def GetModelMetadata(self, request, context):
        version = request.version if request.HasField("version") else None
        servable = self.registry.get(request.model_name, version)
        return model_metadata(servable, self.registry.versions(servable.name))

    @translate_errors(STATUS_BY_ERROR)
    def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[
                model_metadata(servable, self.registry.versions(name))
                for name, servable in sorted(self.registry.served().items())
            ]
        )
