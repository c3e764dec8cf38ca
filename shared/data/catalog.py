"""Datasets by name: the built-in `digits` set, plus IDX directories and .npz
files found in a data directory (`resolve_data_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shared.dtypes import as_model_dtype

from .dataset import Dataset, DatasetNotFound
from .digits import load_digits
from .idx import find_idx_files, load_idx_dataset
from .npz import load_npz_dataset

DATA_DIR_ENV = "TANDEM_DATA_DIR"
# Where Debian's `dataset-fashion-mnist` package installs fashion-mnist/.
DEFAULT_DATA_DIR = Path("/usr/share/datasets")
BUILTIN_DATASETS = ("digits",)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The explicit argument, else $TANDEM_DATA_DIR, else /usr/share/datasets."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def list_datasets(data_dir: str | os.PathLike | None = None) -> list[str]:
    return sorted({*BUILTIN_DATASETS, *_discover(resolve_data_dir(data_dir))})


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, dtype=np.float32) -> Dataset:
    """Load a dataset by name; the built-in `digits` wins over a same-named file."""
    dtype = as_model_dtype(dtype)
    if name == "digits":
        return load_digits(dtype)
    root = resolve_data_dir(data_dir)
    found = _discover(root)
    if name not in found:
        available = ", ".join(sorted({*BUILTIN_DATASETS, *found}))
        raise DatasetNotFound(
            f"no dataset named {name!r}; available: {available} "
            f"(data dir searched: {root}; pass data_dir or set {DATA_DIR_ENV})"
        )
    path = found[name]
    if path.is_dir():
        return load_idx_dataset(name, path, dtype)
    return load_npz_dataset(name, path, dtype)


def _discover(root: Path) -> dict[str, Path]:
    """Map name -> IDX directory or .npz file, in `root` and its immediate subdirectories.

    A missing root holds no datasets. On a name clash the first found wins, root first.
    """
    if not root.is_dir():
        return {}
    found: dict[str, Path] = {}
    for directory in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if find_idx_files(directory) is not None:
            found.setdefault(directory.name, directory)
        for file in sorted(directory.glob("*.npz")):
            found.setdefault(file.stem, file)
    return found
