"""A servable: one model version, loaded from the store, verified and warmed up.

Loading reads the checkpoint (the store checks its checksum, its
architecture and that it is the model and version it was stored as), then
runs one forward pass so that the first real request pays no set-up cost.
A servable never changes after that; new versions are new servables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.store import CheckpointStore
from shared.nn import Model, softmax


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per load
class Servable:
    name: str
    version: int
    model: Model
    meta: CheckpointMeta

    @classmethod
    def load(cls, store: CheckpointStore, name: str, version: int) -> Servable:
        checkpoint = store.get(name, version)
        servable = cls(name, version, checkpoint.model, checkpoint.meta)
        servable.probabilities(np.zeros((1, *servable.input_shape), dtype=checkpoint.model.dtype))
        return servable

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.model.input_shape

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (float32) for a checked batch in the model's dtype.

        Finite inputs can still overflow the dtype inside the forward pass:
        those rows come out as NaN or infinity, without a warning per pass;
        `Predictor` refuses them, request by request.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            return softmax(self.model.forward(x)).astype(np.float32, copy=False)
