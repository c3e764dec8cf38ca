"""A dataset in memory (Dataset) and the checks every loader applies to its arrays.

Every dataset comes back in the same shape: images as (N, 1, H, W) floats in
[0, 1] (flat features as (N, F)), labels as int64 class indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DatasetError(ValueError):
    """A dataset file is unreadable or malformed; the message names the file."""


class DatasetNotFound(LookupError):
    """No dataset of that name; the message lists the available ones."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.x_train.shape[1:]

    @classmethod
    def from_arrays(cls, name, x_train, y_train, x_test, y_test) -> Dataset:
        """Build a dataset whose classes are 0 .. max label seen in either split."""
        for split, labels in (("train", y_train), ("test", y_test)):
            if len(labels) == 0:
                raise DatasetError(f"dataset {name!r}: the {split} split has no samples")
        y_train = y_train.astype(np.int64, copy=False)
        y_test = y_test.astype(np.int64, copy=False)
        num_classes = int(np.concatenate([y_train, y_test]).max(initial=-1)) + 1
        return cls(name, x_train, y_train, x_test, y_test, num_classes)


def scale_pixels(x: np.ndarray, dtype, max_value: int) -> np.ndarray:
    """Integer pixels 0..max_value -> [0, 1] floats of exactly `dtype`; float x is only cast.

    `dtype` is a np.dtype or a scalar type such as np.float32.
    """
    dtype = np.dtype(dtype)
    out = x.astype(dtype)
    if np.issubdtype(x.dtype, np.integer):
        out /= dtype.type(max_value)  # in place, so no float64 intermediate
    return out


def as_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Check that `y` is a 1-D array of non-negative integers; return it as int64."""
    if y.ndim != 1:
        raise DatasetError(f"{where}: labels must be 1-D, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DatasetError(f"{where}: labels must be >= 0, found {y.min()}")
    return y.astype(np.int64, copy=False)


# The checks below look at this much of an array at a time, so that checking
# a large array costs a few MiB of temporaries, not a copy of it.
CHECK_CHUNK_BYTES = 4 * 2**20


def _chunks(flat: np.ndarray):
    """(start, view) pairs covering a 1-D array, CHECK_CHUNK_BYTES at a time."""
    step = max(1, CHECK_CHUNK_BYTES // flat.itemsize)
    for start in range(0, flat.size, step):
        yield start, flat[start : start + step]


def check_finite(x: np.ndarray, where: str) -> None:
    """Raise DatasetError naming the first sample (along axis 0) of `x` that holds a NaN or an infinity.

    `x` must be C-contiguous (its flat view is then free); integers are always finite.
    """
    if not np.issubdtype(x.dtype, np.floating) or x.size == 0:
        return
    flat = x.reshape(-1)
    per_sample = x.size // len(x)
    for start, chunk in _chunks(flat):
        bad = ~np.isfinite(chunk)
        if bad.any():
            index = start + int(bad.argmax())
            raise DatasetError(
                f"{where}: sample {index // per_sample} holds {flat[index]}; x must hold finite numbers"
            )


def check_labels(y: np.ndarray, where: str, stop: int, why: str = "") -> int:
    """Check that every label of 1-D integer `y` is in 0 .. stop - 1; return the largest (-1 if none).

    The error names the first label out of range and its sample; `why` says
    where `stop` comes from.
    """
    largest = -1
    for start, chunk in _chunks(y):
        bad = (chunk < 0) | (chunk >= stop)
        if bad.any():
            index = start + int(bad.argmax())
            raise DatasetError(f"{where}: label {y[index]} of sample {index} is not in 0..{stop - 1}{why}")
        largest = max(largest, int(chunk.max()))
    return largest
