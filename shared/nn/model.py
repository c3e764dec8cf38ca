"""A model: a checked stack of layers with its spec, dtype and parameters."""

from __future__ import annotations

import numpy as np

from shared.dtypes import as_model_dtype
from shared.nn.layers import Layer
from shared.nn.losses import SoftmaxCrossEntropy, softmax


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


class Model:
    """Layers in sequence; the last one outputs one logit per class.

    Parameters are named "layers.<index>.<W|b>", the names used by
    `state_dict`, the optimisers and checkpoints.
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

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"layers.{i}.{name}": shape
            for i, layer in enumerate(self.layers)
            for name, shape in layer.param_shapes().items()
        }

    def decayed_parameters(self) -> frozenset[str]:
        """The parameters weight decay applies to, by name: those their layers declare."""
        return frozenset(
            f"layers.{i}.{name}" for i, layer in enumerate(self.layers) for name in layer.decayed_params
        )

    def initialise(self, seed: int | np.random.Generator) -> Model:
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.initialise(rng, self.dtype)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The parameters by name (the live arrays, not copies)."""
        return {
            f"layers.{i}.{name}": array
            for i, layer in enumerate(self.layers)
            for name, array in layer.params.items()
        }

    def gradients(self) -> dict[str, np.ndarray]:
        return {
            f"layers.{i}.{name}": array
            for i, layer in enumerate(self.layers)
            for name, array in layer.grads.items()
        }

    def load_state_dict(self, weights: dict[str, np.ndarray], *, copy: bool = True) -> Model:
        """Take parameters from `weights`, which must match this architecture exactly.

        They are copied, unless `copy=False`: then arrays already of the model's dtype
        are taken as they are, shared with the caller (a decoded checkpoint's read-only
        views into its blob, which serving only reads; training writes its parameters
        in place, so a model to train gets copies).
        """
        expected = self.param_shapes()
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the architecture: missing {missing}, unexpected {unexpected}"
            )
        for name, shape in expected.items():
            if tuple(weights[name].shape) != tuple(shape):
                raise ValueError(
                    f"weights do not match the architecture: {name} has shape "
                    f"{tuple(weights[name].shape)}, the spec needs {tuple(shape)}"
                )
        take = np.array if copy else np.asarray  # asarray copies only to change the dtype
        for i, layer in enumerate(self.layers):
            layer.params = {
                name: take(weights[f"layers.{i}.{name}"], dtype=self.dtype) for name in layer.param_shapes()
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

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Logits for a batch."""
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

    def train_step_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Forward, loss and backward on one batch; returns (loss, logits).

        Gradients are left in each layer's `grads` (see `gradients()`).
        """
        logits = self.forward(x, training=True)
        loss = self.loss.forward(logits, y)
        self.backward(self.loss.backward())
        return loss, logits

    def predict_proba(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Softmax probabilities, computed in batches to bound memory."""
        x = self._check_batch(x)
        parts = [softmax(self.forward(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_classes), self.dtype)

    def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return self.predict_proba(x, batch_size).argmax(axis=1)
