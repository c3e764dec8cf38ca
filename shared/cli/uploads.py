"""The files `tandem jobs upload` sends, read into the arrays of an UploadDataset call.

    an .npz file      its arrays as they are: x_train, y_train, x_test, y_test, or x and y
    four IDX files    x_train, y_train, x_test, y_test from train-images-idx3-ubyte,
                      train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte
                      (each may be .gz), given as files or as the directory holding them

Arrays travel as they are stored (uint8 pixels stay uint8, a quarter of their
float32 size): the trainer scales and checks them as it does its own files.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from shared.data import read_idx
from shared.data.idx import IDX_FILES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, find_idx_files

ARRAY_OF_IDX_FILE = {
    TRAIN_IMAGES: "x_train",
    TRAIN_LABELS: "y_train",
    TEST_IMAGES: "x_test",
    TEST_LABELS: "y_test",
}


def read_dataset_files(files: list[str]) -> dict[str, np.ndarray]:
    """The arrays in an .npz file, or in the four IDX files (or their directory) of a dataset."""
    paths = [Path(file) for file in files]
    if len(paths) == 1 and paths[0].is_dir():
        found = find_idx_files(paths[0])
        if found is None:
            raise ValueError(f"{paths[0]}: expected the IDX files {', '.join(IDX_FILES)} (or .gz) in it")
        paths = list(found.values())
    if len(paths) == 1 and paths[0].suffix == ".npz":
        return read_npz(paths[0])
    return read_idx_files(paths)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, EOFError, zipfile.BadZipFile) as error:  # OSErrors name the file themselves
        raise ValueError(f"{path}: cannot load as .npz: {error}") from None


def read_idx_files(paths: list[Path]) -> dict[str, np.ndarray]:
    """The arrays of the four IDX files, known by their names."""
    by_stem = {path.name.removesuffix(".gz"): path for path in paths}
    unknown = [str(path) for stem, path in by_stem.items() if stem not in ARRAY_OF_IDX_FILE]
    missing = [stem for stem in IDX_FILES if stem not in by_stem]
    if unknown or missing or len(by_stem) != len(paths):
        raise ValueError(
            "expected one .npz file, or the four IDX files of a dataset: "
            f"{', '.join(IDX_FILES)} (each may be .gz)"
            + (f"; not one of them: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing and not unknown else "")
        )
    return {ARRAY_OF_IDX_FILE[stem]: read_idx(path) for stem, path in by_stem.items()}
