"""Weight initialisers. Biases always start at zero.

Draws are made in float64 from the generator and then cast, so a float32
and a float64 model built from the same seed start from the same weights
(up to rounding).
"""

from __future__ import annotations

import numpy as np


def _he(rng, shape, fan_in, fan_out, std):
    return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)


def _xavier(rng, shape, fan_in, fan_out, std):
    return rng.standard_normal(shape) * np.sqrt(2.0 / (fan_in + fan_out))


def _normal(rng, shape, fan_in, fan_out, std):
    return rng.standard_normal(shape) * std


INITIALISERS = {
    "he": _he,  # He et al. 2015: std sqrt(2 / fan_in), for ReLU layers
    "xavier": _xavier,  # Glorot & Bengio 2010: std sqrt(2 / (fan_in + fan_out))
    "normal": _normal,  # fixed std (`init_std`, 0.01 by default), as the seeds' TwoLayerNet
}


def initialise(
    name: str, rng: np.random.Generator, shape, fan_in: int, fan_out: int, std: float, dtype
) -> np.ndarray:
    return INITIALISERS[name](rng, shape, fan_in, fan_out, std).astype(dtype)
