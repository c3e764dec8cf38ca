"""Numerical gradients by central difference, for checking backprop.

After cs231n's `eval_numerical_gradient_array` and `rel_error`, with the
seeds' h = 1e-4. Use float64: float32 cannot resolve differences of h.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

H = 1e-4


def numerical_gradient(f: Callable[[], float], x: np.ndarray, h: float = H) -> np.ndarray:
    """d f() / d x, where f reads x; x is perturbed in place and restored."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        original = x[index]
        x[index] = original + h
        plus = f()
        x[index] = original - h
        minus = f()
        x[index] = original
        grad[index] = (plus - minus) / (2 * h)
    return grad


def eval_numerical_gradient_array(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, upstream: np.ndarray, h: float = H
) -> np.ndarray:
    """Gradient of sum(f(x) * upstream) with respect to x: checks any layer's backward."""
    return numerical_gradient(lambda: float(np.sum(f(x) * upstream)), x, h)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise relative error |a - b| / max(1e-8, |a| + |b|)."""
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))
