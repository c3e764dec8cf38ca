"""Window geometry shared by convolution and pooling: sizes, strides, padding.

Output size along one axis is o = floor((i + pad_before + pad_after - f) / s) + 1.
"same" padding follows TensorFlow: the output is ceil(i / s) and, when the
total padding is odd, the extra row/column goes to the bottom/right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class SpecError(ValueError):
    """A model spec, or one layer's settings, that cannot work."""


def as_pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as (height, width)."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    ):
        raise SpecError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise SpecError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def normalise_padding(padding) -> str | tuple[int, int]:
    """'same', 'valid', or a non-negative int / pair of ints (both sides)."""
    if isinstance(padding, str):
        if padding.lower() in ("same", "valid"):
            return padding.lower()
        raise SpecError(f"padding must be 'same', 'valid' or an int, got {padding!r}")
    return as_pair("padding", padding, minimum=0)


@dataclass(frozen=True)
class Window:
    """A sliding window over an (H, W) plane: kernel, stride and explicit padding."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: str | tuple[int, int]
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    out_h: int
    out_w: int

    @property
    def padded(self) -> bool:
        return any((self.pad_top, self.pad_bottom, self.pad_left, self.pad_right))


def _pads(size: int, kernel: int, stride: int, padding) -> tuple[int, int]:
    if padding == "valid":
        return 0, 0
    if padding == "same":
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    return padding, padding


def make_window(in_hw: tuple[int, int], kernel, stride, padding) -> Window:
    """Resolve a window over an input plane, or raise SpecError if it cannot fit."""
    kernel = as_pair("kernel_size", kernel, minimum=1)
    stride = as_pair("stride", stride, minimum=1)
    padding = normalise_padding(padding)
    per_axis = padding if isinstance(padding, tuple) else (padding, padding)
    (top, bottom), (left, right) = (
        _pads(in_hw[0], kernel[0], stride[0], per_axis[0]),
        _pads(in_hw[1], kernel[1], stride[1], per_axis[1]),
    )
    padded_h, padded_w = in_hw[0] + top + bottom, in_hw[1] + left + right
    if kernel[0] > padded_h or kernel[1] > padded_w:
        raise SpecError(
            f"kernel {kernel[0]}x{kernel[1]} is larger than the padded input {padded_h}x{padded_w}"
        )
    return Window(
        kernel=kernel,
        stride=stride,
        padding=padding,
        pad_top=top,
        pad_bottom=bottom,
        pad_left=left,
        pad_right=right,
        out_h=(padded_h - kernel[0]) // stride[0] + 1,
        out_w=(padded_w - kernel[1]) // stride[1] + 1,
    )
