"""A model: a checked stack of layers with its spec, dtype and parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from shared.dtypes import as_model_dtype
from shared.nn.layers import Dropout, Layer
from shared.nn.losses import SoftmaxCrossEntropy, softmax

_Value = TypeVar("_Value")


def as_batch(array: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """`array` as a batch for a model with samples of `input_shape`.

    Accepts a batch of samples of that shape or flat (N, prod(shape)), or
    one sample either way; anything else is a ValueError giving the shapes.
    """
    flat = (int(np.prod(input_shape)),)
    for sample in (tuple(input_shape), flat):
        if array.shape == sample:
            return array.reshape(1, *input_shape)
        if array.shape[1:] == sample:
            return array.reshape(len(array), *input_shape)
    raise ValueError(
        f"shape {list(array.shape)} does not fit the model's samples of shape {list(input_shape)} "
        f"(or flat {list(flat)}): send one sample or a batch [N, ...] of them"
    )


# Dropout's generators are seeded [seed, NOISE_STREAM, step, layer index]: the constant keeps
# them apart from the other streams a run seeds from its seed (fit's shuffle is [seed, epoch]).
NOISE_STREAM = 0x44524F50  # "DROP"


class Model:
    """Layers in sequence; the last one outputs one logit per class.

    A model has two modes, chosen per call rather than held as state, so no
    path can be left in the wrong one: training (`train_step_gradients`,
    the training loop's one forward with `training=True`) and evaluation
    (every other path: `forward`'s default, `predict_proba`, fit's
    evaluation, serving, export). Dropout is on and BatchNorm uses (and
    updates) batch statistics only in training.

    Its state is named "layers.<index>.<name>": parameters ("W", "b",
    "gamma", "beta"), which the optimisers step, and buffers
    ("running_mean", "running_var"), which training updates and no optimiser
    touches. `parameters()` and `buffers()` are the live arrays: writing
    them changes the model, and an optimiser steps `parameters()` in place.
    `state_dict()` is a copy of both, safe to keep while training goes on;
    `load_state_dict` copies what it is given (unless told not to).
    Checkpoints hold both kinds.
    """

    def __init__(self, spec: dict, layers: list[Layer], dtype=np.float32):
        self.spec = spec
        self.layers = layers
        self.dtype = as_model_dtype(dtype)
        self.loss = SoftmaxCrossEntropy()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.layers[0].input_shape

    @property
    def num_classes(self) -> int:
        return self.layers[-1].output_shape[0]

    def _named(self, per_layer: Callable[[Layer], dict[str, _Value]]) -> dict[str, _Value]:
        """`per_layer(layer)`'s entries for every layer, by their model-wide names."""
        return {
            f"layers.{i}.{name}": value
            for i, layer in enumerate(self.layers)
            for name, value in per_layer(layer).items()
        }

    def decayed_parameters(self) -> frozenset[str]:
        """The parameters weight decay applies to, by name: those their layers declare."""
        return frozenset(
            f"layers.{i}.{name}" for i, layer in enumerate(self.layers) for name in layer.decayed_params
        )

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._named(lambda layer: layer.param_shapes())

    def buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._named(lambda layer: layer.buffer_shapes())

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of everything `state_dict` holds: parameters, then buffers."""
        return {**self.param_shapes(), **self.buffer_shapes()}

    def initialise(self, seed: int | np.random.Generator) -> Model:
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.initialise(rng, self.dtype)
        return self

    def parameters(self) -> dict[str, np.ndarray]:
        """The trainable parameters by name: the live arrays (an optimiser steps them in place)."""
        return self._named(lambda layer: layer.params)

    def buffers(self) -> dict[str, np.ndarray]:
        """The buffers (BatchNorm's running statistics) by name: the live arrays."""
        return self._named(lambda layer: layer.buffers)

    def gradients(self) -> dict[str, np.ndarray]:
        return self._named(lambda layer: layer.grads)

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of the parameters and buffers by name: a snapshot that training does not change."""
        return {name: array.copy() for name, array in {**self.parameters(), **self.buffers()}.items()}

    def load_state_dict(self, state: dict[str, np.ndarray], *, copy: bool = True) -> Model:
        """Take parameters and buffers from `state`, which must match this architecture exactly.

        They are copied, unless `copy=False`: then arrays already of the model's dtype
        are taken as they are, shared with the caller (a decoded checkpoint's read-only
        views into its blob, which serving only reads; training writes its parameters
        and buffers in place, so a model to train gets copies).
        """
        expected = self.state_shapes()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the architecture: missing {missing}, unexpected {unexpected}"
            )
        for name, shape in expected.items():
            if tuple(state[name].shape) != tuple(shape):
                raise ValueError(
                    f"weights do not match the architecture: {name} has shape "
                    f"{tuple(state[name].shape)}, the spec needs {tuple(shape)}"
                )
        take = np.array if copy else np.asarray  # asarray copies only to change the dtype
        for i, layer in enumerate(self.layers):
            layer.params = {
                name: take(state[f"layers.{i}.{name}"], dtype=self.dtype) for name in layer.param_shapes()
            }
            layer.buffers = {
                name: take(state[f"layers.{i}.{name}"], dtype=self.dtype) for name in layer.buffer_shapes()
            }
        return self

    def _check_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[1:] != self.input_shape:
            raise ValueError(
                f"input batch has sample shape {x.shape[1:]}, the model needs {self.input_shape}"
            )
        # The one deliberate cast: inputs are brought to the model's dtype at the door.
        return x.astype(self.dtype, copy=False)

    def forward(self, x: np.ndarray, *, training: bool = False) -> np.ndarray:
        """Logits for a batch; in evaluation mode unless `training` (see the class docstring)."""
        out = self._check_batch(x)
        for layer in self.layers:
            out = layer.forward(out, training)
        return out

    def first_with_parameters(self) -> int:
        """The index of the first layer with parameters (0 if none has any): where backward stops."""
        return next((i for i, layer in enumerate(self.layers) if layer.param_shapes()), 0)

    def backward(self, dlogits: np.ndarray) -> None:
        """Fill every layer's `grads`. Backpropagation stops at the first layer with
        parameters, which skips its input's gradient: no parameter depends on it."""
        first = self.first_with_parameters()
        grad = dlogits
        for layer in self.layers[:first:-1]:
            grad = layer.backward(grad)
        self.layers[first].backward_parameters(grad)

    def train_step_gradients(
        self, x: np.ndarray, y: np.ndarray, *, step_seed: tuple[int, int] | None = None
    ) -> tuple[float, np.ndarray]:
        """Forward in training mode, loss and backward on one batch; returns (loss, logits).

        Gradients are left in each layer's `grads` (see `gradients()`).
        `step_seed` is (the run's seed, the steps done before this one, as fit
        counts them over the whole run): each Dropout layer
        draws this step's mask from a generator seeded by it and the layer's
        index alone, never from one carried over from earlier steps, so that a
        run resumed at any step draws what the unbroken run drew. A model with
        Dropout needs it; others ignore it.
        """
        self._seed_dropout(step_seed)
        logits = self.forward(x, training=True)
        loss = self.loss.forward(logits, y)
        self.backward(self.loss.backward())
        return loss, logits

    def _seed_dropout(self, step_seed: tuple[int, int] | None) -> None:
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dropout):
                layer.generator = (
                    None
                    if step_seed is None
                    else np.random.default_rng([step_seed[0], NOISE_STREAM, step_seed[1], i])
                )

    def predict_proba(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Softmax probabilities in evaluation mode, computed in batches to bound memory."""
        x = self._check_batch(x)
        parts = [softmax(self.forward(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_classes), self.dtype)

    def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return self.predict_proba(x, batch_size).argmax(axis=1)
