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

    @property
    def overlapping(self) -> bool:
        """Whether neighbouring windows share inputs: a stride below the kernel size."""
        return self.stride[0] < self.kernel[0] or self.stride[1] < self.kernel[1]


def check_pool_padding(window: Window) -> None:
    """Refuse (SpecError) padding above half the window on any side, as PyTorch's pooling does.

    Pooling leaves padding out of the max and the mean, so a window over
    padding alone has no value: -inf for max, 0/0 for the mean, and a NaN
    loss. With at most size // 2 on each side, every window covers a real
    input: the first starts at -pad and ends at size - 1 - pad >= 0. "same"
    padding never pads more than (size - 1) - (size - 1) // 2 <= size // 2 on
    a side, so it always passes; the rule bites only on integer padding.
    """
    kh, kw = window.kernel
    if max(window.pad_top, window.pad_bottom) > kh // 2 or max(window.pad_left, window.pad_right) > kw // 2:
        raise SpecError(
            f"padding {window.padding} with a {kh}x{kw} window: padding must be at most half "
            "the window (size // 2) in each dimension, as PyTorch requires"
        )


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


@dataclass(frozen=True)
class Tap:
    """One kernel offset (i, j) of a window, clipped to the unpadded input.

    Output position (oh, ow) sees input (oh * sh + i - pad_top, ow * sw + j - pad_left).
    `inputs` are the rows and columns of the input that this offset reads,
    `outputs` the output positions that read them; the other output
    positions see padding. Kernels index the real input with these slices
    instead of building a padded copy.
    """

    i: int
    j: int
    inputs: tuple[slice, slice]
    outputs: tuple[slice, slice]
    reads_every_input: bool
    feeds_every_output: bool


def _clip(offset: int, pad: int, stride: int, size: int, out: int) -> tuple[slice, slice, int]:
    """(input slice, output slice, count) along one axis for kernel offset `offset`."""
    first = max(0, -((offset - pad) // stride))  # smallest o with o * stride + offset - pad >= 0
    count = max(0, min(out, (size - 1 + pad - offset) // stride + 1) - first)
    start = first * stride + offset - pad
    return (
        slice(start, start + stride * (count - 1) + 1 if count else start, stride),
        slice(first, first + count),
        count,
    )


def window_taps(window: Window, in_hw: tuple[int, int]) -> tuple[Tap, ...]:
    """Every kernel offset of `window` over an input plane of `in_hw`, row by row."""
    (h, w), (kh, kw), (sh, sw) = in_hw, window.kernel, window.stride
    taps = []
    for i in range(kh):
        rows_in, rows_out, n_rows = _clip(i, window.pad_top, sh, h, window.out_h)
        for j in range(kw):
            cols_in, cols_out, n_cols = _clip(j, window.pad_left, sw, w, window.out_w)
            taps.append(
                Tap(
                    i,
                    j,
                    (rows_in, cols_in),
                    (rows_out, cols_out),
                    reads_every_input=(n_rows, n_cols) == (h, w) and (sh, sw) == (1, 1),
                    feeds_every_output=(n_rows, n_cols) == (window.out_h, window.out_w),
                )
            )
    return tuple(taps)
