"""The checkpoint format: a safetensors blob with Tandem's metadata in its header.

safetensors (https://github.com/huggingface/safetensors) stores raw,
row-major, little-endian tensors with dtype and shape, after a JSON header
whose "__metadata__" maps strings to strings:

    8 bytes      the header's length N, little-endian
    N bytes      the header: JSON, padded with spaces to a multiple of 8 bytes;
                 per tensor {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}
    the data     the tensors' bytes, back to back, in the order of their offsets

Nothing in it is ever unpickled. Tandem's metadata sits under one key,
"tandem", as JSON:

    format       2 (this build writes 2, reads 1 and 2)
    model_name   a safe identifier
    version      the store's version number (0 when never published)
    spec         the normalised architecture spec (see shared.nn.spec)
    dtype        "float32" or "float64"
    step, epoch  how far training had got
    metrics      the latest metrics (floats)
    dataset      the dataset's name
    hyperparameters
    created_at   ISO 8601 UTC time
    xxh3_128     format 2: XXH3-128 of the weights (see `weights_xxh3_128`)
    sha256       format 1: SHA-256 of the weights (see `weights_sha256`); "" in format 2

The two formats differ only in the checksum: SHA-256 took longer than moving
the checkpoint to Redis (11 ms for 19 MB), XXH3-128 keeps up with memory.
It guards against corruption and mix-ups, not against a forger: whoever can
write the blob can write a matching checksum of either kind.

The blob is written with safetensors' own layout (`tests` check that
safetensors.numpy reads it, and writes the same bytes), but built here, so
that the tensors are never copied: `encode_parts` hands out the header and
a view of each tensor's buffer, for the store to send as they are. The
tensors are the model's parameters and buffers (BatchNorm's running
statistics), named "layers.<index>.<name>" (see `Model`); a model without
buffers writes the blob it wrote before buffers existed. Decoding reads
the tensors as views into the blob, checks the layout as strictly as
safetensors does, verifies the checksum and the architecture (every
parameter and buffer the spec has, in its shape, and nothing else), and
refuses a checkpoint that fails any of it with a CheckpointError that
says what was wrong. Weights must be finite, both
ways: a diverged model is neither written nor read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import xxhash

from shared.dtypes import MODEL_DTYPES
from shared.nn import Model, SpecError, build_model

FORMAT_VERSION = 2  # the format this build writes; CHECKSUMS (below) says which it reads
METADATA_KEY = "tandem"
# safetensors' names of the dtypes a model computes in (shared.dtypes.MODEL_DTYPES), by numpy's
# type string (dtype.name costs 7 us, dtype.str 1 us: per tensor, per publish and per load).
SAFETENSORS_DTYPES = {"<f4": "F32", "<f8": "F64"}
NUMPY_DTYPES = {code: np.dtype(typestr) for typestr, code in SAFETENSORS_DTYPES.items()}
# A header holds the spec and metadata: kilobytes. A length claim above this is refused
# before anything is read or allocated for it (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
HEADER_ALIGNMENT = 8  # safetensors pads the header so that the data starts 8-byte aligned
# Model names become parts of Redis keys and file names: keep them plain.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: corrupt, tampered with, or not Tandem's."""


@dataclass(frozen=True)
class CheckpointMeta:
    model_name: str
    spec: dict
    dtype: str
    version: int = 0
    step: int = 0
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    dataset: str = ""
    hyperparameters: dict = field(default_factory=dict)
    created_at: str = ""
    sha256: str = ""
    xxh3_128: str = ""


@dataclass(frozen=True)
class Checkpoint:
    """A decoded checkpoint. The model's weights are read-only views into the blob.

    Serving only reads them; to train on, load them into a new model
    (`Model.load_state_dict` copies them), as a resumed training does.
    """

    model: Model
    meta: CheckpointMeta


@dataclass(frozen=True)
class EncodedCheckpoint:
    """A checkpoint as the pieces of its blob: the header, then each tensor's bytes.

    The tensors' pieces are views of the model's own arrays (not copies): the
    model must not change until the pieces have been written out.
    """

    meta: CheckpointMeta  # as written into the header
    parts: tuple[bytes | memoryview, ...]

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"model_name must be 1-64 letters, digits, '_', '.' or '-', starting with a letter "
            f"or digit; got {name!r}"
        )
    return name


def meta_fields(meta: CheckpointMeta) -> dict[str, Any]:
    """The metadata's fields by name, for JSON (dataclasses.asdict deep-copies the spec: not needed)."""
    return {f.name: getattr(meta, f.name) for f in fields(meta)}


def _weights_digest(weights: dict[str, np.ndarray], digest) -> str:
    """`digest` over each tensor's name, dtype, shape and little-endian bytes, by name."""
    for name in sorted(weights):
        array = _little_endian(weights[name])
        digest.update(f"{name}|{array.dtype.str}|{list(array.shape)}\n".encode())
        digest.update(_bytes_of(array))
    return digest.hexdigest()


def weights_xxh3_128(weights: dict[str, np.ndarray]) -> str:
    """Format 2's checksum: XXH3-128 (hex), one pass over each tensor at memory speed."""
    return _weights_digest(weights, xxhash.xxh3_128())


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """Format 1's checksum: SHA-256 (hex); still verified when a format-1 checkpoint is read."""
    return _weights_digest(weights, hashlib.sha256())


# format -> the metadata field holding its checksum, and the function that computes it
CHECKSUMS = {1: ("sha256", weights_sha256), 2: ("xxh3_128", weights_xxh3_128)}


def _little_endian(array: np.ndarray) -> np.ndarray:
    """`array` contiguous and little-endian: itself, uncopied, when it already is (always, here)."""
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def _bytes_of(array: np.ndarray) -> memoryview:
    """A contiguous array's buffer as bytes, uncopied."""
    return array.reshape(-1).view(np.uint8).data


def _check_finite(weights: dict[str, np.ndarray]) -> None:
    """NaN or infinite weights answer every input with NaN: such a model is never stored or served."""
    bad = sorted(name for name, array in weights.items() if not _is_finite(array))
    if bad:
        raise CheckpointError(f"non-finite weights (NaN or infinity) in {', '.join(bad)}")


def _is_finite(array: np.ndarray) -> bool:
    """Whether every element is finite, in one pass that allocates nothing for finite weights.

    A dot product is NaN or infinite when any element is (BLAS, about twice as
    fast as np.isfinite(array).all(), which also allocates a boolean per
    element); it also overflows for finite elements beyond ~1e19 (float32),
    so only its "not finite" is checked element by element.
    """
    flat = array.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow, or inf * 0, is the answer here
        return bool(np.isfinite(np.dot(flat, flat)) or np.isfinite(flat).all())


# Encoding


def encode_parts(model: Model, meta: CheckpointMeta) -> EncodedCheckpoint:
    """A model's weights with `meta` (spec, dtype, time and checksum filled in), in pieces.

    Each tensor is read twice (finite check, checksum) and copied never; the
    pieces joined are the blob `encode` returns. Non-finite weights are a
    CheckpointError.
    """
    check_model_name(meta.model_name)
    live = {**model.parameters(), **model.buffers()}  # not state_dict(), which copies
    weights = {name: _little_endian(array) for name, array in sorted(live.items())}
    _check_finite(weights)
    meta = replace(
        meta,
        spec=model.spec,
        dtype=model.dtype.name,
        created_at=meta.created_at or datetime.now(UTC).isoformat(timespec="milliseconds"),
        sha256="",
        xxh3_128=weights_xxh3_128(weights),
    )
    tandem = json.dumps({"format": FORMAT_VERSION, **meta_fields(meta)}, sort_keys=True)
    header = _safetensors_header(weights, {METADATA_KEY: tandem})
    return EncodedCheckpoint(meta, (header, *(_bytes_of(array) for array in weights.values())))


def _safetensors_header(weights: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The length and JSON header that safetensors writes for `weights` (in this order), byte for byte.

    safetensors orders the tensors by dtype, then name: one dtype here, so by
    name. Its JSON is compact, not ASCII-escaped, padded with spaces to 8 bytes.
    """
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, array in weights.items():
        entries[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype.str],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def encode(model: Model, meta: CheckpointMeta) -> bytes:
    """The checkpoint as one blob (see `encode_parts`)."""
    return b"".join(encode_parts(model, meta).parts)


# Decoding


def read_meta(blob: bytes | memoryview) -> CheckpointMeta:
    """The metadata alone, from the header, without touching the weights."""
    return _read_header(memoryview(blob))[0]


def _read_header(blob: memoryview) -> tuple[CheckpointMeta, int, dict, int]:
    """(metadata, format, the header's tensor entries, where the data starts), checked for sizes first."""
    if len(blob) < 8:
        raise CheckpointError(f"checkpoint is truncated: {len(blob)} bytes, no header")
    (header_len,) = struct.unpack("<Q", blob[:8])
    # A safetensors file opens with its header's length. One past the limit is some other
    # kind of file (any text reads as quintillions of bytes): said so, not as a number.
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"not a Tandem checkpoint (not a safetensors file: its header claims {header_len:,} bytes, "
            f"over the limit of {MAX_HEADER_BYTES:,})"
        )
    if header_len > len(blob) - 8:
        raise CheckpointError(
            f"checkpoint is truncated: header says {header_len} bytes, {len(blob) - 8} follow"
        )
    try:
        header = json.loads(bytes(blob[8 : 8 + header_len]))
        metadata = header.pop("__metadata__")
        tandem = json.loads(metadata[METADATA_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"not a Tandem checkpoint: unreadable header ({error!r:.200})") from None
    if not isinstance(tandem, dict):
        raise CheckpointError("not a Tandem checkpoint: its metadata is not a JSON object")
    version = tandem.pop("format", None)
    if type(version) is not int or version not in CHECKSUMS:  # not True, 1.0 or a list
        raise CheckpointError(
            f"unsupported checkpoint format {version!r:.40}; this build reads formats "
            f"{', '.join(map(str, CHECKSUMS))}"
        )
    try:
        meta = CheckpointMeta(**tandem)
    except TypeError as error:
        raise CheckpointError(f"not a Tandem checkpoint: {error}") from None
    return meta, version, header, 8 + header_len


def _tensors(blob: memoryview, entries: dict, data_start: int) -> dict[str, np.ndarray]:
    """The header's tensors as read-only views into `blob`, once their layout is checked.

    As safetensors requires: each entry a known dtype, a shape and offsets whose
    size agrees with it; the tensors back to back from the data's start, covering it
    to its end (no gaps, no overlaps, nothing after).
    """
    layout = sorted((_tensor_entry(name, entry) for name, entry in entries.items()), key=lambda t: t[3])
    data = blob[data_start:]
    end = 0
    for name, _dtype, _shape, begin, stop in layout:
        if begin != end:
            raise CheckpointError(
                f"corrupt checkpoint: tensor {name} starts at byte {begin} of the data, "
                f"the tensors before it end at {end} (a gap or an overlap)"
            )
        end = stop
    if end != len(data):
        raise CheckpointError(
            f"corrupt checkpoint: the tensors cover {end} bytes of data, {len(data)} follow the header"
        )
    return {
        name: np.frombuffer(data[begin:stop], dtype=dtype).reshape(shape)
        for name, dtype, shape, begin, stop in layout
    }


def _tensor_entry(name: str, entry) -> tuple[str, np.dtype, tuple[int, ...], int, int]:
    """(name, dtype, shape, begin, end) of one header entry; CheckpointError unless it is well-formed."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"corrupt checkpoint: tensor {name!r:.80} needs exactly dtype, shape and data_offsets, "
            f"got {entry!r:.200}"
        )
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in NUMPY_DTYPES:
        raise CheckpointError(
            f"corrupt checkpoint: tensor {name!r:.80} has dtype {code!r:.40}; "
            f"Tandem's checkpoints hold {' or '.join(NUMPY_DTYPES)}"
        )
    if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
        raise CheckpointError(f"corrupt checkpoint: tensor {name!r:.80} has shape {shape!r:.200}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise CheckpointError(
            f"corrupt checkpoint: tensor {name!r:.80} has data_offsets {offsets!r:.200}, not [begin, end]"
        )
    dtype, (begin, end) = NUMPY_DTYPES[code], offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"corrupt checkpoint: tensor {name!r:.80} of shape {shape} and dtype {code} takes "
            f"{math.prod(shape) * dtype.itemsize} bytes, its data_offsets [{begin}, {end}] hold {end - begin}"
        )
    return name, dtype, tuple(shape), begin, end


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode(blob: bytes | memoryview) -> Checkpoint:
    """Load and verify a checkpoint: layout, checksum, finiteness, then architecture.

    The weights are not copied: the model's arrays are read-only views into `blob`.
    """
    view = memoryview(blob)
    meta, version, entries, data_start = _read_header(view)
    weights = _tensors(view, entries, data_start)
    _check_checksum(weights, meta, version)
    if meta.dtype not in MODEL_DTYPES:
        raise CheckpointError(
            f"architecture mismatch: dtype {meta.dtype!r:.40} is not {' or '.join(MODEL_DTYPES)}"
        )
    wrong_dtype = sorted(name for name, array in weights.items() if array.dtype != meta.dtype)
    if wrong_dtype:
        raise CheckpointError(f"architecture mismatch: {wrong_dtype} are not {meta.dtype}")
    _check_finite(weights)
    try:
        model = build_model(meta.spec, dtype=meta.dtype)
        model.load_state_dict(weights, copy=False)
    except (SpecError, ValueError) as error:
        raise CheckpointError(f"architecture mismatch: {error}") from None
    return Checkpoint(model, meta)


def _check_checksum(weights: dict[str, np.ndarray], meta: CheckpointMeta, version: int) -> None:
    """The checksum that the checkpoint's format names must match the weights."""
    field_name, checksum = CHECKSUMS[version]
    recorded, actual = getattr(meta, field_name), checksum(weights)
    if actual != recorded:
        raise CheckpointError(
            f"checksum mismatch: the header says {field_name} {str(recorded)[:16]}…, "
            f"the weights hash to {actual[:16]}…"
        )


def save(path, model: Model, meta: CheckpointMeta) -> None:
    with open(path, "wb") as f:
        f.writelines(encode_parts(model, meta).parts)


def load(path) -> Checkpoint:
    with open(path, "rb") as f:
        return decode(f.read())
