"""The checkpoint format: a safetensors blob with Tandem's metadata in its header.

safetensors (https://github.com/huggingface/safetensors) stores raw,
row-major, little-endian tensors with dtype and shape, after a JSON header
whose "__metadata__" maps strings to strings. Nothing in it is ever
unpickled. Tandem's metadata sits under one key, "tandem", as JSON:

    format       1
    model_name   a safe identifier
    version      the store's version number (0 when never published)
    spec         the normalised architecture spec (see shared.nn.spec)
    dtype        "float32" or "float64"
    step, epoch  how far training had got
    metrics      the latest metrics (floats)
    dataset      the dataset's name
    hyperparameters
    created_at   ISO 8601 UTC time
    sha256       SHA-256 of the weights (see `weights_sha256`)

Decoding verifies the checksum and the architecture against the weights'
shapes, and refuses a checkpoint that fails either with a CheckpointError
that says which. Weights must be finite, both ways: a diverged model is
neither written nor read.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import safetensors
import safetensors.numpy

from shared.nn import Model, SpecError, build_model

FORMAT_VERSION = 1
METADATA_KEY = "tandem"
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


@dataclass(frozen=True)
class Checkpoint:
    model: Model
    meta: CheckpointMeta


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"model_name must be 1-64 letters, digits, '_', '.' or '-', starting with a letter "
            f"or digit; got {name!r}"
        )
    return name


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and little-endian bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{name}|{array.dtype.str}|{list(array.shape)}\n".encode())
        digest.update(array.data.cast("B"))  # the contiguous array's buffer, as memoryview(array)
    return digest.hexdigest()


def _check_finite(weights: dict[str, np.ndarray]) -> None:
    """NaN or infinite weights answer every input with NaN: such a model is never stored or served."""
    bad = sorted(name for name, array in weights.items() if not np.isfinite(array).all())
    if bad:
        raise CheckpointError(f"non-finite weights (NaN or infinity) in {', '.join(bad)}")


def encode(model: Model, meta: CheckpointMeta) -> bytes:
    """Serialise a model's weights with `meta`; spec, dtype, time and checksum are filled in.

    Non-finite weights are a CheckpointError.
    """
    check_model_name(meta.model_name)
    weights = model.state_dict()
    _check_finite(weights)
    meta = replace(
        meta,
        spec=model.spec,
        dtype=model.dtype.name,
        created_at=meta.created_at or datetime.now(UTC).isoformat(timespec="milliseconds"),
        sha256=weights_sha256(weights),
    )
    header = json.dumps({"format": FORMAT_VERSION, **asdict(meta)}, sort_keys=True)
    return safetensors.numpy.save(weights, metadata={METADATA_KEY: header})


def read_meta(blob: bytes) -> CheckpointMeta:
    """The metadata alone, from the header, without touching the weights."""
    if len(blob) < 8:
        raise CheckpointError(f"checkpoint is truncated: {len(blob)} bytes, no header")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > len(blob) - 8:
        raise CheckpointError(
            f"checkpoint is truncated: header says {header_len} bytes, {len(blob) - 8} follow"
        )
    try:
        header = json.loads(blob[8 : 8 + header_len])
        fields = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"not a Tandem checkpoint: unreadable header ({error})") from None
    if not isinstance(fields, dict):
        raise CheckpointError("not a Tandem checkpoint: its metadata is not a JSON object")
    if fields.pop("format", None) != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format; this build reads format {FORMAT_VERSION}")
    try:
        return CheckpointMeta(**fields)
    except TypeError as error:
        raise CheckpointError(f"not a Tandem checkpoint: {error}") from None


def decode(blob: bytes) -> Checkpoint:
    """Load and verify a checkpoint: checksum first, then architecture."""
    meta = read_meta(blob)
    try:
        weights = safetensors.numpy.load(bytes(blob))
    except (safetensors.SafetensorError, ValueError) as error:
        raise CheckpointError(f"corrupt checkpoint: {error}") from None
    actual = weights_sha256(weights)
    if actual != meta.sha256:
        raise CheckpointError(
            f"checksum mismatch: the header says sha256 {meta.sha256[:16]}…, "
            f"the weights hash to {actual[:16]}…"
        )
    wrong_dtype = sorted(name for name, array in weights.items() if array.dtype.name != meta.dtype)
    if wrong_dtype:
        raise CheckpointError(f"architecture mismatch: {wrong_dtype} are not {meta.dtype}")
    _check_finite(weights)
    try:
        model = build_model(meta.spec, dtype=meta.dtype)
        model.load_state_dict(weights)
    except (SpecError, ValueError) as error:
        raise CheckpointError(f"architecture mismatch: {error}") from None
    return Checkpoint(model, meta)


def save(path, model: Model, meta: CheckpointMeta) -> None:
    with open(path, "wb") as f:
        f.write(encode(model, meta))


def load(path) -> Checkpoint:
    with open(path, "rb") as f:
        return decode(f.read())
