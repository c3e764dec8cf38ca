"""The inference service's client (proto/tandem_inference.proto): predictions and model metadata.

    with InferenceClient("127.0.0.1:50052") as inference:
        inference.wait_until_ready(10)
        prediction = inference.predict("digits-cnn", x_test)   # x_test: [N, 1, 8, 8]
        prediction.classes, prediction.probabilities, prediction.version

`predict` returns a `Prediction`, with the response's tensors decoded to
numpy arrays; the other methods return the response's ModelMetadata
messages as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.client.connection import Connection, ServiceClient
from shared.rpc.convert import from_tensor, to_tensor
from shared.rpc.stubs import tandem_inference_pb2 as inference_pb
from shared.rpc.stubs import tandem_inference_pb2_grpc

INFERENCE_SERVICE = inference_pb.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass(frozen=True)
class Prediction:
    """A PredictResponse with its tensors decoded to numpy arrays.

    `probabilities` is read-only (it shares the response's bytes);
    np.array(prediction.probabilities) makes a writable copy.
    """

    model_name: str
    version: int  # the version that computed every row
    probabilities: np.ndarray  # float32 [N, classes]; rows sum to 1
    classes: np.ndarray  # int64 [N]: each row's most probable class
    top_k_classes: np.ndarray  # int64 [N, k], most probable first; k = 0 without top_k
    top_k_probabilities: np.ndarray  # float32 [N, k], in the same order


class InferenceClient(ServiceClient):
    """A channel to one inference server; `timeout` bounds each call."""

    service = INFERENCE_SERVICE

    def __init__(self, target: str, timeout: float = 30.0, connection: Connection | None = None):
        # The server bounds what it sends (INFER_MAX_MESSAGE_BYTES); gRPC's own 4 MiB default
        # would refuse a large batch's probabilities here after the server computed them.
        super().__init__(target, timeout, connection, options=[("grpc.max_receive_message_length", -1)])
        self._inference = tandem_inference_pb2_grpc.InferenceStub(self._channel)

    def predict(
        self, model_name: str, inputs: np.ndarray, version: int | None = None, top_k: int = 0
    ) -> Prediction:
        """Class probabilities for the samples `inputs`, [N, *input_shape] (or flat [N, features]).

        float32 and float64 travel as they are (the server converts them to
        the model's dtype); any other dtype is refused. `version` asks for
        one loaded version rather than the one the server's policy serves;
        `top_k` > 0 also ranks each row's k most probable classes.
        """
        response = self._inference.Predict(
            inference_pb.PredictRequest(
                model_name=model_name, version=version, inputs=to_tensor(inputs), top_k=top_k
            ),
            timeout=self.timeout,
        )
        probabilities = from_tensor(
            response.probabilities, allowed_dtypes=("float32",), field="probabilities"
        )
        rows = len(response.classes)
        return Prediction(
            model_name=response.model_name,
            version=response.version,
            probabilities=probabilities,
            classes=np.array(response.classes, dtype=np.int64),
            top_k_classes=np.array([row.classes for row in response.top_k], dtype=np.int64).reshape(
                rows, top_k
            ),
            top_k_probabilities=np.array(
                [row.probabilities for row in response.top_k], dtype=np.float32
            ).reshape(rows, top_k),
        )

    def model_metadata(self, model_name: str, version: int | None = None) -> inference_pb.ModelMetadata:
        """What the model expects (input shape, classes, dtype) and which version answers."""
        return self._inference.GetModelMetadata(
            inference_pb.GetModelMetadataRequest(model_name=model_name, version=version), timeout=self.timeout
        )

    def list_models(self) -> list[inference_pb.ModelMetadata]:
        """Every model the server has loaded, by name, each as its served version."""
        response = self._inference.ListModels(inference_pb.ListModelsRequest(), timeout=self.timeout)
        return list(response.models)
