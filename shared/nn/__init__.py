"""Tandem's NumPy learning core: layers, models from specs, losses, optimisers, the training
loop (fit.py) and a whole training run from hyperparameters (run.py).

May import shared.data and the base modules; knows nothing of Redis or gRPC."""

from shared.nn.fit import (
    EarlyStopping,
    EpochEvent,
    History,
    StepEvent,
    StopTraining,
    TrainingDiverged,
    evaluate,
    fit,
)
from shared.nn.geometry import SpecError
from shared.nn.gradcheck import eval_numerical_gradient_array, numerical_gradient, rel_error
from shared.nn.layers import LAYER_TYPES
from shared.nn.losses import SoftmaxCrossEntropy, log_softmax, softmax, top_k
from shared.nn.model import Model, as_batch
from shared.nn.optim import OPTIMIZERS, SGD, Adam, make_optimizer
from shared.nn.spec import build_model, spec_to_json

__all__ = [
    "LAYER_TYPES",
    "OPTIMIZERS",
    "SGD",
    "Adam",
    "EarlyStopping",
    "EpochEvent",
    "History",
    "Model",
    "SoftmaxCrossEntropy",
    "SpecError",
    "StepEvent",
    "StopTraining",
    "TrainingDiverged",
    "as_batch",
    "build_model",
    "eval_numerical_gradient_array",
    "evaluate",
    "fit",
    "log_softmax",
    "make_optimizer",
    "numerical_gradient",
    "rel_error",
    "softmax",
    "spec_to_json",
    "top_k",
]
