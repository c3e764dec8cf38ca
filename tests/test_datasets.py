"""Tests for shared.data: IDX and npz discovery and loading, digits, splitting."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from shared.data import (
    DatasetError,
    DatasetNotFound,
    list_datasets,
    load_dataset,
    read_idx,
    stratified_split,
)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_TYPE_CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    monkeypatch.delenv("TANDEM_DATA_DIR", raising=False)


def idx_bytes(array: np.ndarray) -> bytes:
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = struct.pack(">BBBB", 0, 0, IDX_TYPE_CODES[dtype.str.lstrip("|")], array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_idx_dataset(directory: Path, n_train=6, n_test=4, gz=False, seed=0):
    """Write a tiny IDX dataset of 3x2 uint8 images with labels 0..2; return the arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 2), dtype=np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)
        arrays[split] = images, labels
    return arrays


# --- IDX ---------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_dataset_loads_from_data_dir(tmp_path, gz):
    arrays = make_idx_dataset(tmp_path / "tiny", gz=gz)
    ds = load_dataset("tiny", data_dir=tmp_path)

    train_images, train_labels = arrays["train"]
    assert ds.name == "tiny"
    assert ds.x_train.shape == (6, 1, 3, 2) and ds.x_test.shape == (4, 1, 3, 2)
    assert ds.input_shape == (1, 3, 2)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_allclose(ds.x_train[:, 0], train_images / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, train_labels)
    assert ds.num_classes == 3


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_type(tmp_path, dtype):
    array = np.arange(24).reshape(2, 3, 4).astype(dtype)
    result = read_idx(write_idx(tmp_path / "a.idx", array))
    np.testing.assert_array_equal(result, array)
    assert result.dtype == np.dtype(dtype).newbyteorder("=")


def test_read_idx_truncated_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 2), np.uint8))[:-5])
    with pytest.raises(DatasetError, match="truncated") as excinfo:
        read_idx(path)
    message = str(excinfo.value)
    assert str(path) in message and "expected 28 bytes" in message and "got 23" in message


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(b"PK\x03\x04" + bytes(8)))
    with pytest.raises(DatasetError, match="wrong magic number") as excinfo:
        read_idx(path)
    message = str(excinfo.value)
    assert str(path) in message and "found 0x504B0304" in message and "expected 0x0000" in message


def test_read_idx_unknown_type_code(tmp_path):
    path = tmp_path / "a.idx"
    path.write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 0))
    with pytest.raises(DatasetError, match=r"unknown IDX type code 0x07") as excinfo:
        read_idx(path)
    assert str(path) in str(excinfo.value)


def test_read_idx_trailing_garbage(tmp_path):
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"xx")
    with pytest.raises(DatasetError, match="trailing garbage: 2 bytes") as excinfo:
        read_idx(path)
    assert str(path) in str(excinfo.value)


def test_idx_image_label_count_mismatch(tmp_path):
    make_idx_dataset(tmp_path / "tiny")
    labels_path = write_idx(tmp_path / "tiny" / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DatasetError, match="count mismatch") as excinfo:
        load_dataset("tiny", data_dir=tmp_path)
    message = str(excinfo.value)
    images_path = tmp_path / "tiny" / "t10k-images-idx3-ubyte"
    assert f"{images_path} holds 4 images" in message
    assert f"{labels_path} holds 5 labels" in message


@pytest.mark.parametrize(
    "filename, array, problem",
    [
        ("train-images-idx3-ubyte", np.zeros((6, 6), np.uint8), "images must be 3-D"),
        ("train-labels-idx1-ubyte", np.zeros((6, 1), np.uint8), "labels must be 1-D"),
    ],
)
def test_idx_wrong_rank(tmp_path, filename, array, problem):
    make_idx_dataset(tmp_path / "tiny")
    path = write_idx(tmp_path / "tiny" / filename, array)
    with pytest.raises(DatasetError, match=problem) as excinfo:
        load_dataset("tiny", data_dir=tmp_path)
    assert str(path) in str(excinfo.value)


# --- npz ---------------------------------------------------------------------


def test_npz_with_x_and_y_is_split(tmp_path):
    x = np.arange(40 * 4, dtype=np.uint8).reshape(40, 4)
    y = np.repeat([0, 1], 20)
    np.savez(tmp_path / "flat.npz", x=x, y=y)
    ds = load_dataset("flat", data_dir=tmp_path)

    train, test = stratified_split(y, 0.1, seed=0)
    assert ds.x_train.shape == (36, 4) and ds.x_test.shape == (4, 4)
    np.testing.assert_allclose(ds.x_test, x[test] / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, y[train])
    assert ds.num_classes == 2


def test_npz_with_four_arrays_in_a_subdirectory(tmp_path):
    (tmp_path / "sub").mkdir()
    x_train = np.full((5, 2, 3, 3), 0.25, dtype=np.float64)  # float x is only cast
    x_test = np.full((2, 2, 3, 3), 0.5, dtype=np.float64)
    np.savez(
        tmp_path / "sub" / "four.npz",
        x_train=x_train,
        y_train=np.array([0, 1, 2, 3, 4]),
        x_test=x_test,
        y_test=np.array([6, 0]),
    )
    ds = load_dataset("four", data_dir=tmp_path)
    assert ds.x_train.shape == (5, 2, 3, 3) and ds.x_test.shape == (2, 2, 3, 3)
    assert ds.x_train.dtype == np.float32
    np.testing.assert_array_equal(ds.x_test, np.float32(0.5))
    assert ds.num_classes == 7


def test_npz_3d_x_gets_a_channel_axis(tmp_path):
    np.savez(tmp_path / "img.npz", x=np.zeros((20, 5, 7), np.uint8), y=np.arange(20) % 2)
    ds = load_dataset("img", data_dir=tmp_path)
    assert ds.input_shape == (1, 5, 7)
    assert ds.x_train.shape == (18, 1, 5, 7)


def test_npz_object_array_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, np.int64))
    with pytest.raises(DatasetError, match="cannot load") as excinfo:
        load_dataset("evil", data_dir=tmp_path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, np.int64)}, "x has 4 samples but y has 3"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 0])}, "labels must be >= 0"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "labels must be integers"),
        ({"images": np.zeros((4, 2))}, "expected arrays"),
    ],
)
def test_npz_invalid_contents(tmp_path, arrays, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=problem) as excinfo:
        load_dataset("bad", data_dir=tmp_path)
    assert str(path) in str(excinfo.value)


# --- dtype -------------------------------------------------------------------


def test_dtype_float32_is_default_and_float64_works(tmp_path):
    make_idx_dataset(tmp_path / "tiny")
    assert load_dataset("tiny", data_dir=tmp_path).x_train.dtype == np.float32
    for name in ("tiny", "digits"):
        ds = load_dataset(name, data_dir=tmp_path, dtype=np.float64)
        assert ds.x_train.dtype == np.float64 and ds.x_test.dtype == np.float64
        assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64


@pytest.mark.parametrize("dtype", [np.float16, np.int32, None, "nonsense"])
def test_unsupported_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match="dtype"):
        load_dataset("digits", dtype=dtype)


# --- digits ------------------------------------------------------------------


def test_digits():
    ds = load_dataset("digits")
    assert (len(ds.x_train), len(ds.x_test)) == (1618, 179)
    assert ds.x_train.shape[1:] == ds.x_test.shape[1:] == (1, 8, 8)
    assert ds.x_train.dtype == np.float32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.x_test.min() >= 0.0 and ds.x_test.max() <= 1.0
    assert ds.num_classes == 10
    np.testing.assert_array_equal(np.unique(ds.y_test), np.arange(10))


def test_digits_split_is_deterministic():
    first, second = load_dataset("digits"), load_dataset("digits")
    np.testing.assert_array_equal(first.x_test, second.x_test)
    np.testing.assert_array_equal(first.y_train, second.y_train)


# --- stratified_split --------------------------------------------------------


def test_stratified_split_proportions():
    y = np.repeat([0, 1, 2, 3], [100, 37, 2, 1])
    train, test = stratified_split(y, 0.2, seed=1)
    # round(100*.2)=20, round(37*.2)=7, a class of 2 still gives 1, a class of 1 gives 0
    np.testing.assert_array_equal(np.bincount(y[test], minlength=4), [20, 7, 1, 0])
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))


def test_stratified_split_is_deterministic_per_seed():
    y = np.random.default_rng(0).integers(0, 5, size=500)
    first, again = stratified_split(y, 0.3, seed=7), stratified_split(y, 0.3, seed=7)
    other = stratified_split(y, 0.3, seed=8)
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.zeros(10), fraction, seed=0)


# --- discovery ---------------------------------------------------------------


def test_list_datasets(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "tiny", gz=True)
    np.savez(tmp_path / "flat.npz", x=np.zeros((4, 2)), y=np.zeros(4, np.int64))
    (tmp_path / "nested").mkdir()
    np.savez(tmp_path / "nested" / "deep.npz", x=np.zeros((4, 2)), y=np.zeros(4, np.int64))
    assert list_datasets(tmp_path) == ["deep", "digits", "flat", "tiny"]
    assert list_datasets(tmp_path / "absent") == ["digits"]

    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path))
    assert list_datasets() == ["deep", "digits", "flat", "tiny"]
    assert list_datasets(tmp_path / "nested") == ["deep", "digits"]  # the argument wins


def test_unknown_name_lists_available_datasets(tmp_path):
    np.savez(tmp_path / "flat.npz", x=np.zeros((4, 2)), y=np.zeros(4, np.int64))
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(excinfo.value)
    assert "'mnist'" in message and "digits, flat" in message and str(tmp_path) in message


@pytest.mark.skipif(
    not FASHION_MNIST.is_dir(),
    reason=f"{FASHION_MNIST} absent (install the Debian package dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion-mnist", data_dir=FASHION_MNIST.parent)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.num_classes == 10
