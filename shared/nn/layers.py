"""Layers: small objects with `forward` and `backward`.

Conventions every layer keeps:
- Batches are (N, features) for flat data and (N, C, H, W) for images, in
  any memory layout; the window layers pass images on batch-last in
  memory, (C, H, W, N) (see `Conv2D`), and every layer keeps the layout
  it is given.
- A layer is built for one per-sample `input_shape` and knows its
  `output_shape` at once, so a whole model's shapes are checked before any
  data flows (see `shared.nn.spec`).
- Parameters live in `params` ("W", "b"); `backward` fills `grads` with
  arrays of the same names, shapes and dtype.
- A layer computes in the dtype it is given, never upcasts, and never
  writes into the gradient it was handed.
- `forward(x, training=True)` keeps only what `backward` needs;
  `training=False` keeps nothing.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import ClassVar, TypeVar

import numpy as np

from shared.nn.geometry import SpecError, check_pool_padding, make_window, window_taps
from shared.nn.init import INITIALISERS, initialise
from shared.nn.kernels import col2im, im2col, window_max, window_max_backward, window_sum, window_sum_backward

_Kept = TypeVar("_Kept")


def positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    """A finite number above 0 (an int is taken as a float): NaN or inf would poison every weight."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise SpecError(f"{name} must be a finite number above 0, got {value!r}")
    return float(value)


def init_name(value) -> str:
    if not isinstance(value, str) or value not in INITIALISERS:
        raise SpecError(f"init must be one of {sorted(INITIALISERS)}, got {value!r}")
    return value


class Layer:
    """Base class: a layer without parameters that passes shapes through."""

    type_name: ClassVar[str]
    # The params weight decay applies to: weights, not biases or normalisation scales (the
    # optimisers decay what each layer declares here, whatever its names; see Model).
    decayed_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, input_shape: tuple[int, ...]):
        self.input_shape = tuple(input_shape)
        self.output_shape = self.input_shape
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def config(self) -> dict:
        """The layer's settings as spec data, every default filled in."""
        return {"type": self.type_name}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def initialise(self, rng: np.random.Generator, dtype: np.dtype) -> None:
        """Draw fresh parameters (none for layers without any)."""

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward_parameters(self, dout: np.ndarray) -> None:
        """`backward` without the gradient of the input: for a model's first layer with
        parameters, whose input gradient nothing would use."""
        self.backward(dout)

    def _kept(self, value: _Kept | None) -> _Kept:
        """`value`, kept by the last forward(training=True) for backward."""
        if value is None:
            raise RuntimeError(f"{self.type_name}: backward needs a forward with training=True first")
        return value


class Dense(Layer):
    """Affine layer y = x W + b on flat inputs."""

    type_name = "dense"
    decayed_params = ("W",)

    def __init__(self, input_shape, *, units, init="he", init_std=0.01):
        super().__init__(input_shape)
        if len(self.input_shape) != 1:
            raise SpecError(
                f"dense needs flat samples but is fed samples of shape {self.input_shape}; "
                "put a flatten layer before it"
            )
        self.units = positive_int("units", units)
        self.init = init_name(init)
        self.init_std = positive_float("init_std", init_std)
        self.output_shape = (self.units,)
        self._x: np.ndarray | None = None

    def config(self):
        return {"type": self.type_name, "units": self.units, "init": self.init, "init_std": self.init_std}

    def param_shapes(self):
        return {"W": (self.input_shape[0], self.units), "b": (self.units,)}

    def initialise(self, rng, dtype):
        fan_in, fan_out = self.input_shape[0], self.units
        self.params = {
            "W": initialise(self.init, rng, (fan_in, fan_out), fan_in, fan_out, self.init_std, dtype),
            "b": np.zeros(self.units, dtype=dtype),
        }

    def forward(self, x, training=True):
        self._x = x if training else None
        out = x @ self.params["W"]
        out += self.params["b"]
        return out

    def backward_parameters(self, dout):
        self.grads = {"W": self._kept(self._x).T @ dout, "b": dout.sum(axis=0)}

    def backward(self, dout):
        self.backward_parameters(dout)
        return dout @ self.params["W"].T


class _WindowLayer(Layer):
    """Shared set-up of layers that slide a window over (C, H, W) inputs."""

    def __init__(self, input_shape, kernel_size, stride, padding):
        super().__init__(input_shape)
        if len(self.input_shape) != 3:
            raise SpecError(
                f"{self.type_name} needs (channels, height, width) inputs, got shape {self.input_shape}"
            )
        self.window = make_window(self.input_shape[1:], kernel_size, stride, padding)
        self.taps = window_taps(self.window, self.input_shape[1:])
        self.out_hw = (self.window.out_h, self.window.out_w)

    def _window_config(self):
        w = self.window
        padding = w.padding if isinstance(w.padding, str) else list(w.padding)
        return {"kernel_size": list(w.kernel), "stride": list(w.stride), "padding": padding}


def batch_last(batch: np.ndarray) -> np.ndarray:
    """An (n, c, h, w) batch as a contiguous (c, h, w, n) array: a view if its memory is so already."""
    return np.ascontiguousarray(batch.transpose(1, 2, 3, 0))


def batch_first(array: np.ndarray) -> np.ndarray:
    """A (c, h, w, n) array as the (n, c, h, w) batch it holds: a view."""
    return array.transpose(3, 0, 1, 2)


class Conv2D(_WindowLayer):
    """2-D convolution (cross-correlation) by im2col and one matrix product per pass.

    Memory layout: images are held batch-last, (c, h, w, n) in memory, and
    passed on as (n, c, h, w) views of it. The im2col columns are (c, kh, kw)
    rows, plus a last row of ones, by (oh, ow, n) output positions, so
    [W | b] @ columns is the output, batch-last, bias included, with no
    copy; the weight gradient's product gives the bias gradient as its last
    column. ReLU and pooling keep the layout (see `shared.nn.kernels`), so
    the gradient coming back is batch-last too. In that layout, one kernel
    offset's slice of an image is a run of whole rows of samples (w * n
    values), so im2col and col2im copy long contiguous runs: a col2im of
    (64, 32, 14, 14) took 3 ms batch-last, 11 ms with (c, n, h, w) memory,
    where the runs are 14 values long.

    The columns are filled tap by tap from the unpadded input. In training
    they, and the backward's column gradient, live in buffers kept from
    step to step while the batch size stays (a training model is used by
    one thread; inference allocates afresh, so it may run on many). The
    buffers hold what the last training forward saw: a second training
    forward before the backward overwrites what that backward needs.
    """

    type_name = "conv2d"
    decayed_params = ("W",)

    def __init__(
        self, input_shape, *, filters, kernel_size=3, stride=1, padding="valid", init="he", init_std=0.01
    ):
        super().__init__(input_shape, kernel_size, stride, padding)
        self.filters = positive_int("filters", filters)
        self.init = init_name(init)
        self.init_std = positive_float("init_std", init_std)
        self.output_shape = (self.filters, *self.out_hw)
        self.rows = self.input_shape[0] * math.prod(self.window.kernel)  # of the columns, bias row aside
        self._cols: np.ndarray | None = None
        self._buffers: dict[str, np.ndarray] = {}  # training scratch, by role

    def config(self):
        return {
            "type": self.type_name,
            "filters": self.filters,
            **self._window_config(),
            "init": self.init,
            "init_std": self.init_std,
        }

    def param_shapes(self):
        kh, kw = self.window.kernel
        return {"W": (self.filters, self.input_shape[0], kh, kw), "b": (self.filters,)}

    def initialise(self, rng, dtype):
        kh, kw = self.window.kernel
        channels = self.input_shape[0]
        self.params = {
            "W": initialise(
                self.init,
                rng,
                self.param_shapes()["W"],
                channels * kh * kw,
                self.filters * kh * kw,
                self.init_std,
                dtype,
            ),
            "b": np.zeros(self.filters, dtype=dtype),
        }

    def _windows(self, cols: np.ndarray, n: int) -> np.ndarray:
        """Columns (or their gradient) as the (c, kh, kw, n, oh, ow) view the kernels index."""
        c, (kh, kw), (oh, ow) = self.input_shape[0], self.window.kernel, self.out_hw
        return cols[: self.rows].reshape(c, kh, kw, oh, ow, n).transpose(0, 1, 2, 5, 3, 4)

    def _new_columns(self, n: int, dtype) -> np.ndarray:
        cols = np.zeros((self.rows + 1, n * math.prod(self.out_hw)), dtype=dtype)
        cols[self.rows] = 1  # the bias row
        return cols

    def _buffer(self, role: str, shape: tuple[int, ...], dtype, make) -> np.ndarray:
        """The training buffer for `role`, remade by `make()` when the shape or dtype changes."""
        buffer = self._buffers.get(role)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._buffers[role] = make()
        return buffer

    def forward(self, x, training=True):
        n = x.shape[0]
        if training:
            shape = (self.rows + 1, n * math.prod(self.out_hw))
            cols = self._buffer("cols", shape, x.dtype, lambda: self._new_columns(n, x.dtype))
        else:
            cols = self._new_columns(n, x.dtype)
        im2col(batch_last(x).transpose(0, 3, 1, 2), self.taps, self._windows(cols, n))
        weights = np.concatenate(
            [self.params["W"].reshape(self.filters, self.rows), self.params["b"][:, None]], axis=1
        )
        if training:
            self._cols = cols
        return batch_first((weights @ cols).reshape(self.filters, *self.out_hw, n))

    def backward_parameters(self, dout):
        self._parameter_gradients(self._dout_rows(dout))

    def _dout_rows(self, dout: np.ndarray) -> np.ndarray:
        """dout as (filters, oh * ow * n): a view when it is batch-last."""
        return batch_last(dout).reshape(self.filters, -1)

    def _parameter_gradients(self, dout_rows: np.ndarray) -> None:
        both = dout_rows @ self._kept(self._cols).T  # (filters, rows + 1): [dW | db]
        self.grads = {
            "W": np.ascontiguousarray(both[:, :-1]).reshape(self.params["W"].shape),
            "b": np.ascontiguousarray(both[:, -1]),
        }

    def backward(self, dout):
        n = dout.shape[0]
        dout_rows = self._dout_rows(dout)
        self._parameter_gradients(dout_rows)
        shape = (self.rows, dout_rows.shape[1])
        dcols = self._buffer("dcols", shape, dout.dtype, lambda: np.empty(shape, dtype=dout.dtype))
        np.matmul(self.params["W"].reshape(self.filters, self.rows).T, dout_rows, out=dcols)
        dx = np.empty((*self.input_shape, n), dtype=dout.dtype)  # batch-last
        col2im(self._windows(dcols, n), self.taps, dx.transpose(0, 3, 1, 2))
        return batch_first(dx)


class _Pool2D(_WindowLayer):
    """Pooling settings: a `size` x `size` window moving by `stride` (default: size)."""

    def __init__(self, input_shape, *, size=2, stride=None, padding="valid"):
        super().__init__(input_shape, size, size if stride is None else stride, padding)
        check_pool_padding(self.window)
        self.output_shape = (self.input_shape[0], *self.out_hw)

    def config(self):
        cfg = self._window_config()
        return {
            "type": self.type_name,
            "size": cfg["kernel_size"],
            "stride": cfg["stride"],
            "padding": cfg["padding"],
        }


class MaxPool2D(_Pool2D):
    """Max pooling as an elementwise maximum over the window's strided slices.

    Padding never wins. The backward routes each output's gradient to the
    first maximum of its window (ties go to one input, as an argmax would).
    """

    type_name = "maxpool2d"
    _x: np.ndarray | None = None  # forward's input and output, kept for backward in training
    _out: np.ndarray | None = None

    def forward(self, x, training=True):
        out = window_max(x, self.taps, self.out_hw)
        if training:
            self._x, self._out = x, out
        return out

    def backward(self, dout):
        return window_max_backward(
            self._kept(self._x), self._kept(self._out), dout, self.taps, self.window.overlapping
        )


class AvgPool2D(_Pool2D):
    """Average pooling over the window's strided slices.

    Each window is divided by the number of real (unpadded) inputs it
    covers, as TensorFlow does for "same", so padding never dilutes an
    average.
    """

    type_name = "avgpool2d"

    @cached_property
    def _count(self) -> np.ndarray:
        """How many real inputs each output window covers, shape (out_h, out_w)."""
        return window_sum(np.ones((1, 1, *self.input_shape[1:])), self.taps, self.out_hw)[0, 0]

    def forward(self, x, training=True):
        return window_sum(x, self.taps, self.out_hw) / self._count.astype(x.dtype)

    def backward(self, dout):
        share = dout / self._count.astype(dout.dtype)
        return window_sum_backward(share, self.taps, (dout.shape[0], *self.input_shape))


class Flatten(Layer):
    """(N, ...) to (N, features); the gradient goes back in the memory layout the input had.

    After a window layer that layout is batch-last, and the layers below
    work elementwise between their gradient and what they kept: between
    two layouts that runs far below speed (a (64, 64, 7, 7) multiply took
    2.2 ms against 0.1 ms in one layout, and 0.1 ms for the copy made here).
    """

    type_name = "flatten"

    def __init__(self, input_shape):
        super().__init__(input_shape)
        self.output_shape = (math.prod(self.input_shape),)  # Python ints: no overflow
        self._axes: tuple[int, ...] | None = None  # the input's axes, outermost in memory first

    def forward(self, x, training=True):
        if training:
            self._axes = tuple(int(a) for a in np.argsort([-abs(s) for s in x.strides], kind="stable"))
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        axes = self._kept(self._axes)
        batch = dout.reshape(dout.shape[0], *self.input_shape)
        return np.ascontiguousarray(batch.transpose(axes)).transpose(np.argsort(axes))


class Activation(Layer):
    """An elementwise function: forward keeps, in training, the one array its gradient needs.

    A subclass says what the function is (`apply`), what backward needs of a
    forward pass (`keep`: by default the output), and the gradient from that.
    """

    def __init__(self, input_shape):
        super().__init__(input_shape)
        self._needed: np.ndarray | None = None

    def forward(self, x, training=True):
        out = self.apply(x)
        if training:
            self._needed = self.keep(x, out)
        return out

    def backward(self, dout):
        return self.gradient(dout, self._kept(self._needed))

    def apply(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def keep(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        return out

    def gradient(self, dout: np.ndarray, kept: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ReLU(Activation):
    type_name = "relu"

    def apply(self, x):
        return np.maximum(x, 0)

    def keep(self, x, out):
        return x > 0

    def gradient(self, dout, positive):
        return dout * positive


class Sigmoid(Activation):
    type_name = "sigmoid"

    def apply(self, x):
        # exp of -|x| never overflows; both branches give 1 / (1 + e^-x).
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e))

    def gradient(self, dout, out):
        return dout * out * (1 - out)


class Tanh(Activation):
    type_name = "tanh"

    def apply(self, x):
        return np.tanh(x)

    def gradient(self, dout, out):
        return dout * (1 - out * out)


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.type_name: cls for cls in (Dense, Conv2D, MaxPool2D, AvgPool2D, Flatten, ReLU, Sigmoid, Tanh)
}
