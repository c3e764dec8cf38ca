"""Conversions between domain values and protobuf messages, in one place for both services.

- numpy arrays to and from `tandem.v1.Tensor` (proto/tandem_common.proto);
- job states between the JobState enum and their short names;
- Unix seconds to Timestamp, and a checkpoint's metadata to CheckpointInfo.

A Tensor carries an array as raw bytes (row-major, little-endian, no padding)
with its dtype, by numpy name, and its shape. Decoding trusts nothing: the
dtype must be one the caller allows, every dimension non-negative, and the
byte count exactly prod(shape) * itemsize; the bytes are read with
np.frombuffer at an explicit little-endian dtype (nothing is ever
unpickled). A bad Tensor is a TensorError (a ValueError) whose message names
the field, for an INVALID_ARGUMENT status.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from shared.dtypes import TENSOR_DTYPES as DTYPES
from shared.rpc.stubs import tandem_common_pb2, tandem_trainer_pb2


class TensorError(ValueError):
    """A Tensor message that does not describe a valid array; the message names the field."""


def to_tensor(array) -> tandem_common_pb2.Tensor:
    """Encode an array (anything np.asarray takes) as a Tensor."""
    array = np.asarray(array)
    name = array.dtype.name
    if name not in DTYPES:
        raise TensorError(f"dtype {array.dtype} cannot travel as a Tensor; supported: {', '.join(DTYPES)}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return tandem_common_pb2.Tensor(dtype=name, shape=array.shape, data=little.tobytes(order="C"))


def from_tensor(
    msg: tandem_common_pb2.Tensor,
    *,
    allowed_dtypes: Iterable[str] = DTYPES,
    field: str = "tensor",
) -> np.ndarray:
    """Decode a Tensor into an array of its dtype and shape, in native byte order.

    `allowed_dtypes` limits the dtypes accepted (e.g. MODEL_DTYPES for model
    inputs); `field` is the Tensor's name in the request, used in error
    messages ("inputs.dtype must be one of ..."). The array shares the
    message's bytes and is read-only; np.array(result) makes a writable copy.
    """
    allowed = tuple(allowed_dtypes)
    if msg.dtype not in allowed or msg.dtype not in DTYPES:
        raise TensorError(
            f"{field}.dtype must be one of {', '.join(d for d in allowed if d in DTYPES)}; got {msg.dtype!r}"
        )
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"{field}.shape must have no negative dimension; got {list(shape)}")
    dtype = np.dtype(msg.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    actual = len(msg.data)
    if actual != expected:
        raise TensorError(
            f"{field}.data must hold {expected} bytes (shape {list(shape)} of {msg.dtype}, "
            f"{dtype.itemsize} byte(s) each), got {actual}"
        )
    if msg.dtype == "bool" and actual and np.frombuffer(msg.data, dtype=np.uint8).max() > 1:
        raise TensorError(f"{field}.data: bool elements must be bytes 0 or 1")
    array = np.frombuffer(msg.data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


# ---------------------------------------------------------------- job states

# The JobState enum's names carry a prefix (JOB_STATE_RUNNING); everywhere else
# (the trainer's records, the CLI, logs) a state goes by its short name.
_JOB_STATE_PREFIX = "JOB_STATE_"
JOB_STATE_NAMES = tuple(
    name.removeprefix(_JOB_STATE_PREFIX) for name, number in tandem_trainer_pb2.JobState.items() if number
)


def job_state_name(value: int) -> str:
    """The short name of a JobState value ("RUNNING"); ValueError for UNSPECIFIED or unknown."""
    states = tandem_trainer_pb2.JobState
    name = states.Name(states.ValueType(value)) if value in states.values() else ""
    if not value or not name:
        raise ValueError(f"{value} is not a job state; known: {sorted(n for n in states.values() if n)}")
    return name.removeprefix(_JOB_STATE_PREFIX)


def job_state_value(name: str) -> tandem_trainer_pb2.JobState.ValueType:
    """The JobState value of a short name, in any case ("running" works too)."""
    if name.upper() not in JOB_STATE_NAMES:
        raise ValueError(f"{name!r} is not a job state; known: {', '.join(JOB_STATE_NAMES)}")
    return tandem_trainer_pb2.JobState.Value(_JOB_STATE_PREFIX + name.upper())


# ---------------------------------------------------------------- checkpoints and times


def timestamp(seconds: float) -> Timestamp | None:
    """A Timestamp from Unix seconds; None for 0 (not yet happened)."""
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def checkpoint_info(meta: dict, latest: bool = False) -> tandem_common_pb2.CheckpointInfo:
    """A CheckpointInfo from a checkpoint's metadata (the store's version listing)."""
    created = datetime.fromisoformat(meta["created_at"]).timestamp() if meta.get("created_at") else 0
    return tandem_common_pb2.CheckpointInfo(
        model_name=meta["model_name"],
        version=meta["version"],
        step=meta.get("step", 0),
        epoch=meta.get("epoch", 0),
        metrics={k: float(v) for k, v in meta.get("metrics", {}).items() if isinstance(v, (int, float))},
        dataset=meta.get("dataset", ""),
        created_at=timestamp(created),
        sha256=meta.get("sha256", ""),
        xxh3_128=meta.get("xxh3_128", ""),
        size_bytes=meta.get("size_bytes", 0),
        latest=latest,
        dtype=meta.get("dtype", ""),
    )
