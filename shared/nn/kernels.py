"""Array kernels of the window layers: im2col and col2im for convolution, window maxima and sums
for pooling, and their backward passes.

Every kernel loops over the kernel offsets of a window (`geometry.window_taps`),
never over samples or pixels: per offset it does one strided NumPy operation
between the offset's slice of the input and the output positions that read
it. The taps are clipped to the real input, so no kernel ever builds a
padded copy: what padding would contribute is left out (zero columns, a sum
that skips it, a maximum it never enters).

Images are indexed (n, c, h, w) or, for convolution, (c, n, h, w), in any
memory layout: strided operations follow whatever strides they are given,
and new arrays take the layout of the input they stand for (`*_like`,
order "K"), so a batch held batch-last in memory stays so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.nn.geometry import Tap


def _at(tap: Tap, x: np.ndarray) -> np.ndarray:
    """The input entries offset `tap` reads: x[..., rows, cols]."""
    return x[(..., *tap.inputs)]


def _to(tap: Tap, y: np.ndarray) -> np.ndarray:
    """The output positions that read them: y[..., rows, cols]."""
    return y[(..., *tap.outputs)]


# ---- convolution ------------------------------------------------------------


def im2col(x_cf: np.ndarray, taps: Sequence[Tap], cols: np.ndarray) -> None:
    """Copy the windows of x_cf (c, n, h, w) into `cols` (c, kh, kw, n, oh, ow).

    Entries that see padding are not written: `cols` must hold zeros there,
    as a fresh `np.zeros` buffer, or one only ever filled by this function
    with the same taps, does.
    """
    for tap in taps:
        _to(tap, cols[:, tap.i, tap.j])[...] = _at(tap, x_cf)


def col2im(dcols: np.ndarray, taps: Sequence[Tap], dx_cf: np.ndarray) -> None:
    """The adjoint of `im2col`: dx_cf (c, n, h, w) = the sum, over the taps, of
    `dcols` (c, kh, kw, n, oh, ow) at the inputs each tap read (overwritten)."""
    _accumulate(taps, dx_cf, lambda tap: _to(tap, dcols[:, tap.i, tap.j]))


def _accumulate(taps: Sequence[Tap], dx: np.ndarray, part) -> None:
    """dx = the sum over taps of part(tap) added at the inputs the tap read.

    A stride-1 tap that reads every input is assigned first, so dx needs no
    zeroing; otherwise dx starts from zero.
    """
    first = next((tap for tap in taps if tap.reads_every_input), None)
    if first is None:
        dx[...] = 0
    else:
        dx[...] = part(first)
    for tap in taps:
        if tap is not first:
            target = _at(tap, dx)
            target += part(tap)


# ---- pooling ----------------------------------------------------------------


def _reduce(x: np.ndarray, taps: Sequence[Tap], out_hw: tuple[int, int], ufunc, empty: float) -> np.ndarray:
    """ufunc-reduce every window of x (n, c, h, w); an output with no real input gets `empty`."""
    first = next((tap for tap in taps if tap.feeds_every_output), None)
    out = (  # np.copy keeps the input's layout (order "K")
        np.full((*x.shape[:2], *out_hw), empty, dtype=x.dtype) if first is None else np.copy(_at(first, x))
    )
    for tap in taps:
        if tap is not first:
            target = _to(tap, out)
            ufunc(target, _at(tap, x), out=target)
    return out


def window_max(x: np.ndarray, taps: Sequence[Tap], out_hw: tuple[int, int]) -> np.ndarray:
    """Each window's maximum; padding never wins (-inf for a window of padding only)."""
    return _reduce(x, taps, out_hw, np.maximum, -np.inf)


def window_sum(x: np.ndarray, taps: Sequence[Tap], out_hw: tuple[int, int]) -> np.ndarray:
    """Each window's sum over its real inputs."""
    return _reduce(x, taps, out_hw, np.add, 0.0)


def window_max_backward(
    x: np.ndarray, out: np.ndarray, dout: np.ndarray, taps: Sequence[Tap], overlapping: bool
) -> np.ndarray:
    """Route each output's gradient to the first input of its window (in tap order) that
    equals the window's maximum `out`: ties go to one input, as an argmax's would.

    Windows that do not overlap write each input once, straight from the
    product: a masked `np.add(..., where=)` took 35 ms for the four taps of
    a (64, 32, 28, 28) input, the product 0.6 ms a tap.
    """
    dx = np.zeros_like(x)
    routed = np.zeros_like(out, dtype=bool)  # outputs whose gradient has gone to an input
    last = len(taps) - 1
    for index, tap in enumerate(taps):
        is_max = _at(tap, x) == _to(tap, out)
        already = _to(tap, routed)
        if index:
            np.greater(is_max, already, out=is_max)  # is_max and not already
        if index < last:
            already |= is_max
        target = _at(tap, dx)
        if overlapping:
            target += _to(tap, dout) * is_max
        else:
            np.multiply(_to(tap, dout), is_max, out=target)
    return dx


def window_sum_backward(share: np.ndarray, taps: Sequence[Tap], in_shape: tuple[int, ...]) -> np.ndarray:
    """The adjoint of `window_sum`: each input gets the `share` of every window it is in."""
    dx = np.empty(in_shape, dtype=share.dtype)
    _accumulate(taps, dx, lambda tap: _to(tap, share))
    return dx
