"""The datasets jobs can train on: built-in and data-directory ones, and uploads kept in Redis.

An upload is checked from its header before any memory is set aside for it:
array names, dtypes (plain numeric ones only, by name), shapes, byte counts
and the total against the size limit. Then each array gets one buffer of
its declared size, and the pieces are copied into it as they arrive, so an
upload costs about its own size in memory. Once every array is whole (and
matches its SHA-256), the values are checked a few MiB at a time (x finite,
labels in range) and the buffers are written as they are, in one Redis
transaction: a broken or refused upload leaves nothing behind. Uploaded
arrays are stored as raw little-endian bytes with dtype and shape, never
pickled. Each entry records its uploader (field `owner`, the caller's
identity, shared.security.auth; "" with auth off): only the uploader or an admin may
overwrite it, and the entry is then the overwriter's.

A stored entry is checked again whenever it is read, by the same rules: one
that cannot be read (corrupt, foreign, written by an older build) is left
out of listings, and a job on it is refused, naming the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import numpy as np
import redis
from redis.typing import EncodableT, FieldT

from shared.checkpoints.checkpoint import check_model_name
from shared.checkpoints.redis_client import unavailable_on_error
from shared.data import BUILTIN_DATASETS, Dataset, DatasetError, DatasetNotFound, list_datasets, load_dataset
from shared.data.dataset import check_finite, check_labels
from shared.data.npz import dataset_from_arrays, whole_split
from shared.dtypes import TENSOR_DTYPES
from shared.limits import check_limit
from shared.security.auth import Caller, NotPermitted

log = logging.getLogger(__name__)

SPLIT_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
WHOLE_ARRAYS = ("x", "y")  # split 90/10, stratified, like an .npz with x and y
LABELS_OF = {"x_train": "y_train", "x_test": "y_test", "x": "y"}
LABEL_ARRAYS = tuple(LABELS_OF.values())

# The dtypes an upload may declare, by NumPy name: the numeric ones a Tensor
# carries (shared.rpc.convert). Anything else (structured, object, string,
# datetime, complex, byte-order prefixes) is refused before np.dtype ever
# sees the string.
SAMPLE_DTYPES = tuple(name for name in TENSOR_DTYPES if name != "bool")
LABEL_DTYPES = tuple(name for name in SAMPLE_DTYPES if "int" in name)
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in SAMPLE_DTYPES}
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
OWNER_FIELD = "owner"

MAX_UPLOAD_BYTES_VARIABLE = "TRAINER_MAX_UPLOAD_BYTES"
MAX_CLASSES_VARIABLE = "TRAINER_MAX_CLASSES"


@dataclass(frozen=True)
class ArrayHeader:
    name: str
    dtype: str
    shape: tuple[int, ...]
    size_bytes: int
    sha256: str = ""


@dataclass(frozen=True)
class DatasetSummary:
    """What a listing tells about a dataset (ListDatasets' DatasetInfo)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_size: int
    test_size: int
    source: str  # "builtin", "directory" or "upload"

    @classmethod
    def of(cls, dataset: Dataset, source: str) -> DatasetSummary:
        return cls(
            dataset.name,
            dataset.input_shape,
            dataset.num_classes,
            len(dataset.y_train),
            len(dataset.y_test),
            source,
        )


# ---------------------------------------------------------------- the layout of an upload's arrays


def check_layout(headers: list[ArrayHeader]) -> dict[str, ArrayHeader]:
    """Everything the headers alone can tell, by name; a ValueError names `header.arrays[NAME]`."""
    names = sorted(h.name for h in headers)
    if names not in (sorted(SPLIT_ARRAYS), sorted(WHOLE_ARRAYS)):
        raise ValueError(f"header.arrays must be {list(SPLIT_ARRAYS)} or {list(WHOLE_ARRAYS)}, got {names}")
    for header in headers:
        _check_array(header)
    by_name = {h.name: h for h in headers}
    for x, y in LABELS_OF.items():
        if x in by_name and by_name[x].shape[0] != by_name[y].shape[0]:
            raise ValueError(
                f"header.arrays[{y}].shape: {by_name[y].shape[0]} labels for the "
                f"{by_name[x].shape[0]} samples of {x}"
            )
    if "x_test" in by_name and by_name["x_train"].shape[1:] != by_name["x_test"].shape[1:]:
        raise ValueError(
            f"header.arrays[x_test].shape: samples of {list(by_name['x_test'].shape[1:])}, "
            f"but x_train's are {list(by_name['x_train'].shape[1:])}"
        )
    return by_name


def _check_array(header: ArrayHeader) -> None:
    where = f"header.arrays[{header.name}]"
    is_x = header.name.startswith("x")
    accepted = SAMPLE_DTYPES if is_x else LABEL_DTYPES
    if header.dtype not in accepted:
        raise ValueError(
            f"{where}.dtype {header.dtype!r} is not accepted; "
            f"{'x' if is_x else 'labels'} must be one of {', '.join(accepted)}"
        )
    shape = list(header.shape)
    if is_x and len(shape) not in (2, 3, 4):
        raise ValueError(f"{where}.shape {shape} must be (N, F), (N, H, W) or (N, C, H, W)")
    if not is_x and len(shape) != 1:
        raise ValueError(f"{where}.shape {shape} must be (N,): one label per sample")
    if min(shape) < 1:
        raise ValueError(f"{where}.shape {shape}: every dimension must be at least 1")
    expected = math.prod(shape) * DTYPES[header.dtype].itemsize  # Python ints: no overflow
    if header.size_bytes != expected:
        raise ValueError(
            f"{where}.size_bytes {header.size_bytes} does not match shape {shape} "
            f"of {header.dtype} ({expected} bytes)"
        )
    if header.sha256 and not SHA256_HEX.fullmatch(header.sha256):
        raise ValueError(f"{where}.sha256 must be 64 hexadecimal digits or empty, got {header.sha256!r}")


def as_arrays(
    headers: dict[str, ArrayHeader], data: Mapping[str, bytes | bytearray]
) -> dict[str, np.ndarray]:
    """Views of raw little-endian bytes as the arrays their headers declare (no copy)."""
    return {
        name: np.frombuffer(data[name], dtype=DTYPES[h.dtype]).reshape(h.shape)
        for name, h in headers.items()
        if name in data
    }


def input_shape(headers: dict[str, ArrayHeader]) -> tuple[int, ...]:
    """One sample's shape, as a Dataset has it: (N, H, W) images get a channel axis."""
    shape = headers["x_train" if "x_train" in headers else "x"].shape[1:]
    return (1, *shape) if len(shape) == 2 else shape


# ---------------------------------------------------------------- receiving an upload


class DatasetUpload:
    """One upload being received: its checked headers, one buffer per array, the bytes so far.

    Each piece must start where the bytes received so far end and stay
    within its array's size; it is copied into the buffer at its offset
    (and into the array's SHA-256 when one was declared). `finish` checks
    that every array arrived whole and matches its SHA-256.
    """

    def __init__(self, name: str, headers: dict[str, ArrayHeader], overwrite: bool, uploader: Caller):
        self.name, self.headers, self.overwrite, self.uploader = name, headers, overwrite, uploader
        self.buffers = {array: bytearray(h.size_bytes) for array, h in headers.items()}
        self._digests = {array: hashlib.sha256() for array, h in headers.items() if h.sha256}
        self._received = dict.fromkeys(headers, 0)

    def add(self, array: str, offset: int, data: bytes) -> None:
        if array not in self.headers:
            raise ValueError(f"piece.array must be one of {sorted(self.headers)}, got {array!r}")
        if offset != self._received[array]:
            raise ValueError(
                f"piece.offset {offset} of {array}: expected {self._received[array]} "
                "(pieces must arrive in order, without gaps)"
            )
        end = offset + len(data)
        if end > self.headers[array].size_bytes:
            raise ValueError(
                f"piece.data: more bytes for {array} than its size_bytes {self.headers[array].size_bytes}"
            )
        self.buffers[array][offset:end] = data  # the same length: copied in place, never resized
        if array in self._digests:
            self._digests[array].update(data)
        self._received[array] = end

    def finish(self) -> dict[str, np.ndarray]:
        """Views of the arrays, once every one arrived whole; else ValueError naming what is wrong."""
        short = {
            a: f"{self._received[a]}/{h.size_bytes}"
            for a, h in self.headers.items()
            if self._received[a] != h.size_bytes
        }
        if short:
            raise ValueError(f"upload incomplete: bytes received/declared per array {short}")
        for array, digest in self._digests.items():
            if digest.hexdigest() != self.headers[array].sha256.lower():
                raise ValueError(f"header.arrays[{array}].sha256 does not match the bytes received")
        return as_arrays(self.headers, self.buffers)


# ---------------------------------------------------------------- the catalog


class DatasetCatalog:
    def __init__(
        self,
        client: redis.Redis,
        data_dir: str | None = None,
        *,
        max_upload_bytes: int = 512 * 2**20,
        max_classes: int = 10_000,
        cache_size: int = 4,
        prefix: str = "tandem",
    ):
        self._redis, self._data_dir = client, data_dir
        self.max_upload_bytes, self.max_classes = max_upload_bytes, max_classes
        self._prefix = prefix
        self._cache: OrderedDict[str, Dataset] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _key(self, name: str) -> str:
        return f"{self._prefix}:dataset:{name}"

    # ------------------------------------------------------------ listing

    def summaries(self) -> list[DatasetSummary]:
        """Every dataset a job can train on, by name; one that cannot be read is logged and left out."""
        local = list_datasets(self._data_dir)
        sources = {
            **dict.fromkeys(self._uploaded_names(), "upload"),
            **{name: "builtin" if name in BUILTIN_DATASETS else "directory" for name in local},
        }
        found = []
        for name, source in sorted(sources.items()):
            try:
                found.append(
                    self._stored_summary(name)
                    if source == "upload"
                    else DatasetSummary.of(self.load(name), source)
                )
            except DatasetNotFound:
                pass  # deleted since it was listed
            except DatasetError as error:
                log.warning("event=dataset_unreadable dataset=%s error=%s", name, error)
        return found

    def names(self) -> list[str]:
        return sorted({*list_datasets(self._data_dir), *self._uploaded_names()})

    def _uploaded_names(self) -> list[str]:
        """The names of the stored uploads; a key under the prefix that is no upload's is logged."""
        prefix = self._key("").encode()
        with unavailable_on_error(self._redis):
            keys = list(self._redis.scan_iter(match=self._key("*")))
        names = []
        for key in keys:
            name = key[len(prefix) :].decode(errors="replace")
            if _is_upload_name(name):
                names.append(name)
            else:
                log.warning("event=dataset_key_foreign key=%r", key)
        return names

    # ------------------------------------------------------------ loading

    def load(self, name: str) -> Dataset:
        """A dataset by name (cached): built-in or data directory first, then uploads.

        An upload that cannot be read is a DatasetError naming it.
        """
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        try:
            dataset = load_dataset(name, self._data_dir)
        except DatasetNotFound:
            dataset = self._load_uploaded(name)
        if dataset.num_classes > self.max_classes:  # uploads are checked as they are read; files are not
            raise DatasetError(
                f"dataset {name!r} has {dataset.num_classes:,} classes; at most "
                f"{self.max_classes:,} are allowed (set by {MAX_CLASSES_VARIABLE})"
            )
        with self._lock:
            self._cache[name] = dataset
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return dataset

    def _load_uploaded(self, name: str) -> Dataset:
        if not _is_upload_name(name):
            raise self._not_found(name)
        with unavailable_on_error(self._redis), _reading(name):
            # The client answers bytes (decode_responses off, as `connect` makes it).
            stored = cast(dict[bytes, bytes], self._redis.hgetall(self._key(name)))
            if not stored:
                raise self._not_found(name)
            data = {array: stored.get(array.encode(), b"") for array in SPLIT_ARRAYS + WHOLE_ARRAYS}
            headers = _stored_headers(stored.get(b"header"), {a: len(d) for a, d in data.items()})
            arrays = as_arrays(headers, data)
            self._summary(name, headers, arrays)
            return dataset_from_arrays(name, arrays, f"uploaded dataset {name!r}", np.dtype(np.float32))

    def _stored_summary(self, name: str) -> DatasetSummary:
        """An upload's summary from its header, byte counts and labels: its x is never fetched."""
        key = self._key(name)
        with unavailable_on_error(self._redis), _reading(name):
            with self._redis.pipeline(transaction=True) as pipe:  # one consistent view of the entry
                pipe.hget(key, "header")
                for array in SPLIT_ARRAYS + WHOLE_ARRAYS:
                    pipe.hstrlen(key, array)
                pipe.hmget(key, LABEL_ARRAYS)
                raw_header, *lengths, labels = pipe.execute()
            if raw_header is None and not any(lengths):
                raise self._not_found(name)
            stored_lengths = dict(zip(SPLIT_ARRAYS + WHOLE_ARRAYS, lengths, strict=True))
            headers = _stored_headers(raw_header, stored_lengths)
            labels = {a: data for a, data in zip(LABEL_ARRAYS, labels, strict=True) if data is not None}
            return self._summary(name, headers, as_arrays(headers, labels))

    def _not_found(self, name: str) -> DatasetNotFound:
        return DatasetNotFound(f"dataset {name!r} not found; available: {', '.join(self.names())}")

    # ------------------------------------------------------------ uploading

    def begin_upload(
        self, name: str, headers: list[ArrayHeader], overwrite: bool, uploader: Caller
    ) -> DatasetUpload:
        """Check everything an upload's header tells, then set aside its buffers."""
        if not _is_upload_name(name):
            raise ValueError(f"header.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if name in list_datasets(self._data_dir):
            raise ValueError(f"header.name {name!r} is a built-in or data-directory dataset")
        checked = check_layout(headers)
        check_limit(
            f"upload {name!r}",
            sum(h.size_bytes for h in headers),
            self.max_upload_bytes,
            MAX_UPLOAD_BYTES_VARIABLE,
            "bytes",
        )
        # Checked again when it is stored; this spares receiving a doomed upload.
        with unavailable_on_error(self._redis):
            _check_replaceable(name, _owner(self._redis, self._key(name)), overwrite, uploader)
        return DatasetUpload(name, checked, overwrite, uploader)

    def store_upload(self, upload: DatasetUpload) -> DatasetSummary:
        """Check a complete upload's values, then write its buffers in one transaction (all or nothing)."""
        summary = self._summary(upload.name, upload.headers, upload.finish())
        header = {a: {"dtype": h.dtype, "shape": list(h.shape)} for a, h in upload.headers.items()}
        # redis-py sends a bytearray as it is: the buffers are not copied again.
        # Typed as hset takes them (a Mapping's key type is invariant).
        fields: dict[FieldT, EncodableT] = {
            "header": json.dumps(header),
            OWNER_FIELD: upload.uploader.identity,
        }
        fields.update(upload.buffers.items())
        key = self._key(upload.name)
        with unavailable_on_error(self._redis), self._redis.pipeline(transaction=True) as pipe:
            pipe.watch(key)
            _check_replaceable(upload.name, _owner(pipe, key), upload.overwrite, upload.uploader)
            pipe.multi()
            pipe.delete(key)
            pipe.hset(key, mapping=fields)
            try:
                pipe.execute()
            except redis.WatchError:
                raise FileExistsError(f"another upload of {upload.name!r} finished first") from None
        with self._lock:
            self._cache.pop(upload.name, None)
        return summary

    # ------------------------------------------------------------ the values

    def _summary(
        self, name: str, headers: dict[str, ArrayHeader], arrays: dict[str, np.ndarray]
    ) -> DatasetSummary:
        """Check an upload's values, then summarize it from its headers and labels.

        x must be finite (uploads and loads give every array; listings only
        the labels, which is enough for the summary) and labels in
        0 .. max_classes - 1. Each error names the array and the first bad sample.
        """
        for x in LABELS_OF:
            if x in arrays:
                check_finite(arrays[x], f"header.arrays[{x}]")
        why = f" (at most {self.max_classes:,} classes, set by {MAX_CLASSES_VARIABLE})"
        largest = max(
            check_labels(arrays[y], f"header.arrays[{y}]", self.max_classes, why)
            for y in LABEL_ARRAYS
            if y in headers
        )
        if "y" in headers:
            train, test = whole_split(arrays["y"])
            sizes = len(train), len(test)
            if not sizes[1]:
                raise DatasetError(
                    "header.arrays[y]: the test split would be empty "
                    "(it takes 10% of each class that has two samples or more)"
                )
        else:
            sizes = headers["y_train"].shape[0], headers["y_test"].shape[0]
        return DatasetSummary(name, input_shape(headers), largest + 1, *sizes, "upload")


def _is_upload_name(name: str) -> bool:
    try:
        check_model_name(name)
    except ValueError:
        return False
    return True


def _owner(client, key: str) -> str | None:
    """Who uploaded the entry at `key`: None if there is none, "" if it names no one."""
    try:
        owner = client.hget(key, OWNER_FIELD)
    except redis.ResponseError:  # not a hash: a foreign key, no one's
        return ""
    if owner is not None:
        return owner.decode(errors="replace")
    return "" if client.exists(key) else None


def _check_replaceable(name: str, owner: str | None, overwrite: bool, uploader: Caller) -> None:
    """Whether an upload may be stored as `name`, whose entry `owner` uploaded (None: no entry yet)."""
    if owner is None:
        return
    if not overwrite:
        raise FileExistsError(f"dataset {name!r} exists; set header.overwrite to replace it")
    if not uploader.controls(owner):
        raise NotPermitted(
            f"dataset {name!r} is another caller's upload; only its uploader or an admin may overwrite it"
        )


@contextmanager
def _reading(name: str):
    """Turn whatever makes a stored upload unreadable into a DatasetError naming it."""
    try:
        yield
    except (ValueError, RecursionError, redis.ResponseError) as error:  # ResponseError: not a hash
        raise DatasetError(f"uploaded dataset {name!r} cannot be read: {error}") from None


def _stored_headers(raw: bytes | None, lengths: dict[str, int]) -> dict[str, ArrayHeader]:
    """A stored entry's headers, checked like an upload's, with the byte counts it holds."""
    if raw is None:
        raise ValueError("it has no header")
    declared = json.loads(raw)
    if not isinstance(declared, dict) or not all(
        isinstance(h, dict)
        and isinstance(h.get("dtype"), str)
        and isinstance(h.get("shape"), list)
        and all(type(n) is int for n in h["shape"])
        for h in declared.values()
    ):
        raise ValueError("its header is not {array: {dtype, shape}}")
    return check_layout(
        [
            ArrayHeader(array, h["dtype"], tuple(h["shape"]), lengths.get(array, 0))
            for array, h in declared.items()
        ]
    )
