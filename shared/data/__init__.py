"""Offline datasets for Tandem: `load_dataset("digits")` and whatever IDX or
.npz datasets sit in the data directory (see dataset.py).

May import the base modules (shared.dtypes) only; knows nothing of models, Redis or gRPC."""

from .catalog import BUILTIN_DATASETS, list_datasets, load_dataset, resolve_data_dir
from .dataset import Dataset, DatasetError, DatasetNotFound
from .idx import read_idx
from .npz import dataset_from_arrays
from .split import stratified_split

__all__ = [
    "BUILTIN_DATASETS",
    "Dataset",
    "DatasetError",
    "DatasetNotFound",
    "dataset_from_arrays",
    "list_datasets",
    "load_dataset",
    "read_idx",
    "resolve_data_dir",
    "stratified_split",
]
