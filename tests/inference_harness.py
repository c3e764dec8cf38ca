"""What the inference service's tests share: small models published to a Redis of the
test's own, and servers started in-process with stubs for both APIs (the fixtures that
start them, `checkpoints` and `start_inference`, are in conftest.py).

The server reads the checkpoint store under its fixed prefix "tandem", so each
test gets its own embedded Redis (`private_redis`) rather than the session's.
"""

from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infer_svc.config import InferConfig
from infer_svc.server import InferenceServer
from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.store import CheckpointStore
from shared.nn import Model, build_model, softmax
from shared.nn.presets import get_preset
from shared.rpc.convert import from_tensor, to_tensor
from shared.rpc.stubs import grpc_service_pb2_grpc, tandem_inference_pb2_grpc
from shared.rpc.stubs import tandem_inference_pb2 as pb

NAME = "digits"
INPUT_SHAPE, NUM_CLASSES = (1, 8, 8), 10  # the built-in digits dataset's
DEADLINE = 10.0  # seconds for anything eventual: a reload, readiness


def digits_model(seed: int) -> Model:
    """The digits-cnn preset, freshly initialised: a different seed, different weights."""
    return build_model(get_preset("digits-cnn").spec(INPUT_SHAPE, NUM_CLASSES)).initialise(seed)


def publish(store: CheckpointStore, seed: int, name: str = NAME) -> tuple[int, Model]:
    model = digits_model(seed)
    return store.publish(model, CheckpointMeta(name, model.spec, "float32", dataset="digits")), model


def corrupt(store: CheckpointStore, version: int, name: str = NAME) -> None:
    """Flip the last byte of a stored version: its weights' checksum no longer matches."""
    key = store.keys_for(name).blob(version)
    stored = store.redis.get(key)
    assert isinstance(stored, bytes), f"no version {version} of {name!r} to corrupt"
    blob = bytearray(stored)
    blob[-1] ^= 0xFF
    store.redis.set(key, bytes(blob))


def samples(rows: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, *INPUT_SHAPE)).astype(dtype)


def core_probabilities(model: Model, x: np.ndarray) -> np.ndarray:
    """What the NumPy core itself computes for `x`: the softmax of one forward pass."""
    return softmax(model.forward(x)).astype(np.float32)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to float32 rounding (a batch of another size may sum in another order)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def infer_config(redis_url: str, **settings) -> InferConfig:
    """Every setting explicit, so that INFER_* variables in the environment change nothing."""
    return InferConfig(
        **{
            "redis_url": redis_url,
            "listen": "127.0.0.1:0",
            "models": (NAME,),
            "pinned": {},
            "poll_seconds": 0.05,
            "batching": True,
            "max_batch_size": 64,
            "max_queue_delay_ms": 2.0,
            "max_queue_rows": 4096,
            "max_rows": 4096,
            "max_message_bytes": 16 * 2**20,
            "grace_seconds": 5.0,
            "metrics_port": 0,
            "metrics_address": "127.0.0.1",
            "grpc_workers": 16,
            "http_listen": "127.0.0.1:0",
            **settings,
        }
    )


class Inference:
    """An inference server running in this process, with stubs for its gRPC APIs and health, and
    the URL of its HTTP/REST port (`http_url`, None with http_listen "off")."""

    def __init__(self, config: InferConfig):
        self.server = InferenceServer(config).start()
        self.address = f"127.0.0.1:{self.server.port}"
        http = self.server.http
        self.http_address = f"127.0.0.1:{http.port}" if http else None
        self.http_url = f"{http.scheme}://{self.http_address}" if http else None
        self.channel = grpc.insecure_channel(self.address)
        self.stub = tandem_inference_pb2_grpc.InferenceStub(self.channel)
        self.kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def predict(self, x: np.ndarray, name: str = NAME, **fields) -> pb.PredictResponse:
        request = pb.PredictRequest(model_name=name, inputs=to_tensor(x), **fields)
        return self.stub.Predict(request, timeout=DEADLINE)

    def serving(self, service: str = "") -> bool:
        status = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE).status
        return status == health_pb2.HealthCheckResponse.SERVING

    def served_version(self) -> int:
        return self.predict(samples(1)).version

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=0)


def probabilities(response: pb.PredictResponse) -> np.ndarray:
    return from_tensor(response.probabilities, allowed_dtypes=("float32",), field="probabilities")
