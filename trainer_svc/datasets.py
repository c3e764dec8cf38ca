"""The datasets jobs can train on: built-in and data-directory ones, and uploads kept in Redis.

An upload arrives in chunks and is assembled in memory up to a size limit;
only a complete, consistent upload is written, in one Redis command, so a
broken or partial upload leaves nothing behind. Uploaded arrays are stored
as raw little-endian bytes with dtype and shape, never pickled.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import redis

from shared.checkpoint import check_model_name
from shared.data import (BUILTIN_DATASETS, Dataset, DatasetNotFound, dataset_from_arrays, list_datasets,
                         load_dataset)
from shared.redis_client import unavailable_on_error

SPLIT_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
WHOLE_ARRAYS = ("x", "y")   # split 90/10, stratified, like an .npz with x and y


@dataclass(frozen=True)
class ArrayHeader:
    name: str
    dtype: str
    shape: tuple[int, ...]
    size_bytes: int
    sha256: str = ""


class DatasetUpload:
    """One upload being received: a header announcing the arrays, then their bytes in order.

    Every check that can be made early is: names, dtypes, byte counts
    against shapes, the total against the size limit, each piece's offset.
    `finish` then checks that every array arrived whole (and its SHA-256).
    """

    def __init__(self, name: str, headers: list[ArrayHeader], max_bytes: int):
        try:
            check_model_name(name)
        except ValueError:
            raise ValueError(f"header.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}") from None
        names = sorted(h.name for h in headers)
        if names not in (sorted(SPLIT_ARRAYS), sorted(WHOLE_ARRAYS)):
            raise ValueError(f"header.arrays must be {list(SPLIT_ARRAYS)} or {list(WHOLE_ARRAYS)}, "
                             f"got {names}")
        for header in headers:
            try:
                itemsize = np.dtype(header.dtype).itemsize
            except TypeError:
                raise ValueError(f"header.arrays[{header.name}].dtype {header.dtype!r} is not a dtype") from None
            expected = int(np.prod(header.shape, dtype=np.int64)) * itemsize
            if min(header.shape, default=-1) < 0 or header.size_bytes != expected:
                raise ValueError(f"header.arrays[{header.name}]: size_bytes {header.size_bytes} does not "
                                 f"match shape {list(header.shape)} of {header.dtype} ({expected} bytes)")
        total = sum(h.size_bytes for h in headers)
        if total > max_bytes:
            raise OverflowError(f"dataset {name!r} is {total} bytes; uploads are limited to {max_bytes} bytes")
        self.name = name
        self.headers = {h.name: h for h in headers}
        self._parts: dict[str, list[bytes]] = {h.name: [] for h in headers}
        self._received = {h.name: 0 for h in headers}

    def add(self, array: str, offset: int, data: bytes) -> None:
        if array not in self.headers:
            raise ValueError(f"piece.array must be one of {sorted(self.headers)}, got {array!r}")
        if offset != self._received[array]:
            raise ValueError(f"piece.offset {offset} of {array}: expected {self._received[array]} "
                             "(pieces must arrive in order, without gaps)")
        if offset + len(data) > self.headers[array].size_bytes:
            raise ValueError(f"piece.data: more bytes for {array} than its size_bytes "
                             f"{self.headers[array].size_bytes}")
        self._parts[array].append(data)
        self._received[array] += len(data)

    def finish(self) -> dict[str, np.ndarray]:
        """The arrays, once every one arrived whole; else ValueError naming what is missing."""
        short = {a: f"{self._received[a]}/{h.size_bytes}" for a, h in self.headers.items()
                 if self._received[a] != h.size_bytes}
        if short:
            raise ValueError(f"upload incomplete: bytes received/declared per array {short}")
        arrays = {}
        for array, header in self.headers.items():
            data = b"".join(self._parts[array])
            if header.sha256 and hashlib.sha256(data).hexdigest() != header.sha256.lower():
                raise ValueError(f"header.arrays[{array}].sha256 does not match the bytes received")
            arrays[array] = np.frombuffer(data, dtype=np.dtype(header.dtype).newbyteorder("<")
                                          ).reshape(header.shape)
        return arrays


class DatasetCatalog:
    def __init__(self, client: redis.Redis, data_dir: str | None = None, *,
                 max_upload_bytes: int = 512 * 2**20, cache_size: int = 4, prefix: str = "tandem"):
        self._redis, self._data_dir = client, data_dir
        self.max_upload_bytes = max_upload_bytes
        self._prefix = prefix
        self._cache: OrderedDict[str, Dataset] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _key(self, name: str) -> str:
        return f"{self._prefix}:dataset:{name}"

    def names(self) -> list[str]:
        with unavailable_on_error(self._redis):
            uploaded = [k.decode().rsplit(":", 1)[1] for k in self._redis.scan_iter(self._key("*"))]
        return sorted({*list_datasets(self._data_dir), *uploaded})

    def source(self, name: str) -> str:
        """Where a dataset comes from: "builtin", "directory" or "upload"."""
        if name in BUILTIN_DATASETS:
            return "builtin"
        return "directory" if name in list_datasets(self._data_dir) else "upload"

    def load(self, name: str) -> Dataset:
        """A dataset by name (cached): built-in or data directory first, then uploads."""
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        try:
            dataset = load_dataset(name, self._data_dir)
        except DatasetNotFound:
            dataset = self._load_uploaded(name)
        with self._lock:
            self._cache[name] = dataset
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return dataset

    def _load_uploaded(self, name: str) -> Dataset:
        with unavailable_on_error(self._redis):
            stored = self._redis.hgetall(self._key(name))
        if not stored:
            raise DatasetNotFound(f"dataset {name!r} not found; available: {', '.join(self.names())}")
        headers = json.loads(stored[b"header"])
        arrays = {
            array: np.frombuffer(stored[array.encode()], dtype=np.dtype(h["dtype"]).newbyteorder("<"))
            .reshape(h["shape"])
            for array, h in headers.items()
        }
        return dataset_from_arrays(name, arrays, f"uploaded dataset {name!r}", np.float32)

    def store_upload(self, upload: DatasetUpload, overwrite: bool = False) -> Dataset:
        """Check a complete upload, then write it in one transaction (all or nothing)."""
        arrays = upload.finish()
        if upload.name in list_datasets(self._data_dir):
            raise ValueError(f"header.name {upload.name!r} is a built-in or data-directory dataset")
        dataset = dataset_from_arrays(upload.name, arrays, f"upload {upload.name!r}", np.float32)
        header = {a: {"dtype": h.dtype, "shape": list(h.shape)} for a, h in upload.headers.items()}
        fields = {"header": json.dumps(header), **{a: arrays[a].tobytes() for a in arrays}}
        key = self._key(upload.name)
        with unavailable_on_error(self._redis), self._redis.pipeline(transaction=True) as pipe:
            pipe.watch(key)
            if pipe.exists(key) and not overwrite:
                raise FileExistsError(f"dataset {upload.name!r} exists; set header.overwrite to replace it")
            pipe.multi()
            pipe.delete(key)
            pipe.hset(key, mapping=fields)
            try:
                pipe.execute()
            except redis.WatchError:
                raise FileExistsError(f"another upload of {upload.name!r} finished first") from None
        with self._lock:
            self._cache.pop(upload.name, None)
        return dataset
