"""Python clients of the two services: TrainerClient (trainer.py), InferenceClient and Prediction
(inference.py), and how both connect: TLS, bearer token, health, the base class (connection.py).
May import shared.rpc, shared.security and the base modules only; never cli, nn, checkpoints, a service."""

from shared.client.connection import (
    BearerToken,
    Connection,
    ServiceClient,
    read_token_file,
    token_from_env,
    wait_until_serving,
)
from shared.client.inference import INFERENCE_SERVICE, InferenceClient, Prediction
from shared.client.trainer import TRAINER_SERVICE, TrainerClient

__all__ = [
    "INFERENCE_SERVICE",
    "TRAINER_SERVICE",
    "BearerToken",
    "Connection",
    "InferenceClient",
    "Prediction",
    "ServiceClient",
    "TrainerClient",
    "read_token_file",
    "token_from_env",
    "wait_until_serving",
]
