"""A seeded train/test split that keeps every class's share in both parts."""

from __future__ import annotations

import numpy as np


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train_indices, test_indices), each sorted ascending.

    Each class sends round(count * test_fraction) samples (np.rint) to the test
    set, but at least one and at most count - 1 when it has two or more samples;
    a class of one sample stays in train. The same seed gives the same split.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {y.shape}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    _, counts = np.unique(y, return_counts=True)
    n_test = np.rint(counts * test_fraction).astype(np.int64)
    n_test = np.where(counts >= 2, np.clip(n_test, 1, counts - 1), 0)

    # Shuffle, then stable-sort by label: samples are grouped by class (in
    # np.unique order) and randomly ordered within each group.
    order = np.random.default_rng(seed).permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]
    group_starts = np.cumsum(counts) - counts
    rank_in_class = np.arange(len(y)) - np.repeat(group_starts, counts)
    is_test = rank_in_class < np.repeat(n_test, counts)
    return np.sort(order[~is_test]), np.sort(order[is_test])
