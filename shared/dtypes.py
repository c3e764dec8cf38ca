"""The dtypes Tandem computes in, and the ones a Tensor message can carry: said once, here.

A model, its checkpoints, its inputs and a dataset's samples are float32 or
float64 (MODEL_DTYPES); float32 is the default everywhere. A Tensor on the
wire carries any of TENSOR_DTYPES (numpy names, proto/tandem_common.proto).
"""

from __future__ import annotations

import numpy as np

MODEL_DTYPES = ("float32", "float64")
TENSOR_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    *MODEL_DTYPES,
)


def as_model_dtype(dtype) -> np.dtype:
    """`dtype` as a numpy dtype if it is one a model computes in; else a ValueError naming them.

    None is refused too (np.dtype(None) would be float64).
    """
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError):  # numpy parses "float32,," as a struct and fails so
        resolved = None
    if resolved is None or resolved.name not in MODEL_DTYPES:
        raise ValueError(f"dtype must be {' or '.join(MODEL_DTYPES)}, got {dtype!r}")
    return resolved
