"""numpy arrays to and from `tandem.v1.Tensor` messages (proto/tandem_common.proto).

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

import numpy as np

from shared.rpc import tandem_common_pb2

# The dtypes a Tensor can carry, by numpy name (Tensor.dtype).
DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
)
FLOAT_DTYPES = ("float32", "float64")


class TensorError(ValueError):
    """A Tensor message that does not describe a valid array; the message names the field."""


def to_tensor(array) -> tandem_common_pb2.Tensor:
    """Encode an array (anything np.asarray takes) as a Tensor."""
    array = np.asarray(array)
    name = array.dtype.name
    if name not in DTYPES:
        raise TensorError(
            f"dtype {array.dtype} cannot travel as a Tensor; supported: {', '.join(DTYPES)}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return tandem_common_pb2.Tensor(dtype=name, shape=array.shape, data=little.tobytes(order="C"))


def from_tensor(
    msg: tandem_common_pb2.Tensor,
    *,
    allowed_dtypes: Iterable[str] = DTYPES,
    field: str = "tensor",
) -> np.ndarray:
    """Decode a Tensor into an array of its dtype and shape, in native byte order.

    `allowed_dtypes` limits the dtypes accepted (e.g. FLOAT_DTYPES for model
    inputs); `field` is the Tensor's name in the request, used in error
    messages ("inputs.dtype must be one of ..."). The array shares the
    message's bytes and is read-only; np.array(result) makes a writable copy.
    """
    allowed = tuple(allowed_dtypes)
    if msg.dtype not in allowed or msg.dtype not in DTYPES:
        raise TensorError(
            f"{field}.dtype must be one of {', '.join(d for d in allowed if d in DTYPES)}; "
            f"got {msg.dtype!r}")
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"{field}.shape must have no negative dimension; got {list(shape)}")
    dtype = np.dtype(msg.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize     # Python ints: no overflow
    actual = len(msg.data)
    if actual != expected:
        raise TensorError(
            f"{field}.data must hold {expected} bytes (shape {list(shape)} of {msg.dtype}, "
            f"{dtype.itemsize} byte(s) each), got {actual}")
    if msg.dtype == "bool" and actual and np.frombuffer(msg.data, dtype=np.uint8).max() > 1:
        raise TensorError(f"{field}.data: bool elements must be bytes 0 or 1")
    array = np.frombuffer(msg.data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)
