"""Predictions: checks a batch against the model that will answer it, runs it, ranks classes.

Both servicers (Tandem's Predict and the Open Inference Protocol's
ModelInfer) call `Predictor.predict`, so both check input the same way.
Errors are ValueError (a bad batch, or one whose rows overflow the
model's dtype in the forward pass, so that no answer is ever OK with a
non-finite probability; the message names the field and what was
expected), LookupError (unknown model or version), ModelUnavailable,
CheckpointError (a stored version that fails verification), QueueFull
and BatcherStopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infer_svc.batching import Batcher
from infer_svc.registry import Registry
from shared.nn import as_batch, top_k


@dataclass(frozen=True)
class Prediction:
    model_name: str
    version: int
    probabilities: np.ndarray  # float32 [N, classes]

    @property
    def classes(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(classes, probabilities), each [N, k], most probable first (shared.nn.top_k)."""
        return top_k(self.probabilities, k)


class Predictor:
    def __init__(self, registry: Registry, batcher: Batcher, max_rows: int = 4096):
        self.registry, self.batcher, self.max_rows = registry, batcher, max_rows

    def predict(
        self, model_name: str, inputs: np.ndarray, version: int | None = None, field: str = "inputs"
    ) -> Prediction:
        servable = self.registry.get(model_name, version)
        try:
            x = as_batch(inputs, servable.input_shape)
        except ValueError as error:
            raise ValueError(f"{field}: {error}") from None
        if len(x) == 0:
            raise ValueError(f"{field}: the batch is empty; send at least one sample")
        if len(x) > self.max_rows:
            raise ValueError(f"{field}: {len(x)} rows exceed the limit of {self.max_rows} per request")
        with np.errstate(over="ignore"):  # a value beyond the model dtype's range becomes inf
            x = x.astype(servable.model.dtype, copy=False)
        if (row := first_non_finite_row(x)) is not None:
            raise ValueError(
                f"{field}: NaN, infinity or a value beyond {x.dtype}'s range in the "
                f"input (first in row {row})"
            )
        probabilities = self.batcher.run(servable, x)  # this request's rows alone, even when batched
        if (row := first_non_finite_row(probabilities)) is not None:
            raise ValueError(
                f"{field}: row {row} overflows {x.dtype}'s range in the model's forward "
                f"pass (its probabilities are not finite); scale the input down"
            )
        return Prediction(servable.name, servable.version, probabilities)


def first_non_finite_row(batch: np.ndarray) -> int | None:
    """The index of the first row of `batch` holding NaN or infinity; None if all are finite."""
    bad_rows = ~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
    return int(bad_rows.argmax()) if bad_rows.any() else None
