"""IDX files, the format of MNIST and Fashion-MNIST, and datasets made of them.

An IDX file is: two zero bytes, a type code byte, a byte giving the number of
dimensions, one big-endian uint32 per dimension, then the data, big-endian,
row-major. Files ending in .gz are decompressed transparently.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .dataset import Dataset, DatasetError, as_labels, scale_pixels

_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The four files of an IDX dataset, each optionally gzipped.
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or .gz) into an array of native byte order."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0":
        found = "0x" + raw[:4].hex().upper() if raw else "an empty file"
        raise DatasetError(
            f"{path}: wrong magic number: found {found}, expected 0x0000TTDD "
            "(two zero bytes, a type code TT, the number of dimensions DD)"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _TYPES:
        known = ", ".join(f"0x{code:02X}" for code in _TYPES)
        raise DatasetError(f"{path}: unknown IDX type code 0x{type_code:02X} (known: {known})")
    dtype = _TYPES[type_code]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DatasetError(f"{path}: truncated header: expected {header_size} bytes, got {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    count = int(np.prod(shape))
    expected = header_size + count * dtype.itemsize
    if len(raw) < expected:
        raise DatasetError(
            f"{path}: truncated file: expected {expected} bytes for shape {shape}, got {len(raw)}"
        )
    if len(raw) > expected:
        raise DatasetError(
            f"{path}: trailing garbage: {len(raw) - expected} bytes after the data "
            f"(expected {expected} bytes for shape {shape}, got {len(raw)})"
        )
    data = np.frombuffer(raw, dtype, count=count, offset=header_size)
    return data.astype(dtype.newbyteorder("=")).reshape(shape)  # a writable copy


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in `directory` (raw preferred over .gz), or None if any is missing."""
    files: dict[str, Path] = {}
    for stem in IDX_FILES:
        candidates = [directory / stem, directory / f"{stem}.gz"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            return None
        files[stem] = found
    return files


def load_idx_dataset(name: str, directory: Path, dtype: np.dtype) -> Dataset:
    files = find_idx_files(directory)
    if files is None:
        raise DatasetError(f"{directory}: expected the IDX files {', '.join(IDX_FILES)}")
    x_train, y_train = _split(files[TRAIN_IMAGES], files[TRAIN_LABELS], dtype)
    x_test, y_test = _split(files[TEST_IMAGES], files[TEST_LABELS], dtype)
    return Dataset.from_arrays(name, x_train, y_train, x_test, y_test)


def _split(images_path: Path, labels_path: Path, dtype: np.dtype):
    """One split's images as (N, 1, H, W) floats in [0, 1] and its labels."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DatasetError(f"{images_path}: images must be 3-D (N, H, W), got shape {images.shape}")
    labels = as_labels(labels, str(labels_path))
    if len(images) != len(labels):
        raise DatasetError(
            f"image/label count mismatch: {images_path} holds {len(images)} images "
            f"but {labels_path} holds {len(labels)} labels"
        )
    return scale_pixels(images[:, np.newaxis], dtype, max_value=255), labels


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from e
