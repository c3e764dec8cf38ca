"""The models `tandem evaluate` and `tandem predict` use: a saved one (`read_checkpoint`), one an
inference service serves (`ServedModel`), and a dataset loaded for either (`load_dataset_for`)."""

from __future__ import annotations

import numpy as np

from shared.checkpoints.checkpoint import Checkpoint, CheckpointError, load
from shared.cli.flags import read_dataset
from shared.client import InferenceClient
from shared.data import Dataset
from shared.nn import Model

SERVER_PREDICT_ROWS = 1024  # rows per Predict call (a server takes at most INFER_MAX_ROWS, 4096)


def read_checkpoint(path: str) -> Checkpoint:
    """The checkpoint in the file; a CheckpointError names the file."""
    try:
        return load(path)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


class ServedModel:
    """A model an inference service serves, with the Model attributes predict needs:
    input_shape, num_classes and dtype (from its metadata) and predict_proba (by Predict calls)."""

    def __init__(self, client: InferenceClient, name: str, version: int | None):
        self.client, self.name = client, name
        metadata = client.model_metadata(name, version)
        self.version = metadata.version
        self.input_shape = tuple(metadata.input_shape)
        self.num_classes = metadata.num_classes
        self.dtype = np.dtype(metadata.dtype)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities from the version the metadata described, in calls of at most
        SERVER_PREDICT_ROWS rows, so a reload midway never mixes versions.

        Like Model.predict_proba, it takes samples of any real dtype: they are
        cast to the model's here, as the model would at its door.
        """
        x = x.astype(self.dtype, copy=False)
        parts = [
            self.client.predict(
                self.name, x[start : start + SERVER_PREDICT_ROWS], version=self.version
            ).probabilities
            for start in range(0, len(x), SERVER_PREDICT_ROWS)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_classes), np.float32)


def load_dataset_for(model: Model | ServedModel, name: str, data_dir: str | None, model_text: str) -> Dataset:
    """Load dataset `name` in the model's dtype; refuse it if its samples do not fit the model.

    `model_text` names the model in errors: "the model in PATH", "model 'digits' at HOST:PORT".
    """
    dataset = read_dataset(name, data_dir, model.dtype)
    if dataset.input_shape != model.input_shape:
        raise ValueError(
            f"dataset {name!r} has samples of shape {list(dataset.input_shape)}, "
            f"but {model_text} takes {list(model.input_shape)}"
        )
    if dataset.num_classes > model.num_classes:
        raise ValueError(
            f"dataset {name!r} has {dataset.num_classes} classes, "
            f"but {model_text} tells only {model.num_classes} apart"
        )
    return dataset
