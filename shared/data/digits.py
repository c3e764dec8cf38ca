"""The built-in digits set: 1,797 8x8 handwritten digits, pixels 0..16 (see README.md)."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np

from .dataset import Dataset, scale_pixels
from .split import stratified_split

# A fixed split so that results are comparable across runs and machines.
TEST_FRACTION = 0.1
SPLIT_SEED = 0


def load_digits(dtype: np.dtype) -> Dataset:
    """Rows of the shipped CSV are 64 pixels then the label."""
    with resources.files(__package__).joinpath("digits.csv.gz").open("rb") as f, gzip.open(f, "rt") as text:
        rows = np.loadtxt(text, delimiter=",", dtype=np.int64)
    x = scale_pixels(rows[:, :64].reshape(-1, 1, 8, 8), dtype, max_value=16)
    y = rows[:, 64]
    train, test = stratified_split(y, TEST_FRACTION, seed=SPLIT_SEED)
    return Dataset.from_arrays("digits", x[train], y[train], x[test], y[test])
