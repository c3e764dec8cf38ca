"""Datasets stored as NumPy .npz archives.

An archive holds either x_train, y_train, x_test, y_test, or just x and y (then
split 90/10 with stratified_split, seed 0). x is (N, H, W), (N, C, H, W) or
(N, F); integer x is taken as 0..255 pixels. Archives are opened with
allow_pickle=False, so an object array is refused instead of unpickled.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .dataset import Dataset, DatasetError, as_labels, scale_pixels
from .split import stratified_split

SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
TEST_FRACTION = 0.1
SPLIT_SEED = 0


def load_npz_dataset(name: str, path: Path, dtype: np.dtype) -> Dataset:
    return dataset_from_arrays(name, _read(path), path, dtype)


def dataset_from_arrays(name: str, arrays: dict[str, np.ndarray], path, dtype: np.dtype) -> Dataset:
    """Check and normalise arrays named as in an .npz archive; errors name `path`."""
    if set(SPLIT_KEYS) <= arrays.keys():
        x_train, y_train = _samples(path, arrays, "x_train", "y_train", dtype)
        x_test, y_test = _samples(path, arrays, "x_test", "y_test", dtype)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DatasetError(
                f"{path}: x_train samples have shape {x_train.shape[1:]} "
                f"but x_test samples have shape {x_test.shape[1:]}"
            )
    elif {"x", "y"} <= arrays.keys():
        x, y = _samples(path, arrays, "x", "y", dtype)
        train, test = whole_split(y)
        x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    else:
        raise DatasetError(
            f"{path}: expected arrays {', '.join(SPLIT_KEYS)} or x, y; "
            f"found {', '.join(sorted(arrays)) or 'none'}"
        )
    return Dataset.from_arrays(name, x_train, y_train, x_test, y_test)


def whole_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The train and test indices of a dataset given as x and y alone (see the module docstring)."""
    return stratified_split(y, TEST_FRACTION, seed=SPLIT_SEED)


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        # An object array (which would need unpickling) lands here as a ValueError.
        raise DatasetError(f"{path}: cannot load: {e}") from e


def _samples(path: Path, arrays: dict, x_key: str, y_key: str, dtype: np.dtype):
    """Validate one x/y pair; return x as float `dtype` with a channel axis for images."""
    x = arrays[x_key]
    if x.ndim not in (2, 3, 4):
        raise DatasetError(f"{path}: {x_key} must be (N, F), (N, H, W) or (N, C, H, W), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DatasetError(f"{path}: {x_key} must be integers or floats, got dtype {x.dtype}")
    y = as_labels(arrays[y_key], f"{path}: {y_key}")
    if len(x) != len(y):
        raise DatasetError(f"{path}: {x_key} has {len(x)} samples but {y_key} has {len(y)}")
    if x.ndim == 3:
        x = x[:, np.newaxis]
    return scale_pixels(x, dtype, max_value=255), y
