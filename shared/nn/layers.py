"""Layers: small objects with `forward` and `backward`.

Conventions every layer keeps:
- Batches are (N, features) for flat data and (N, C, H, W) for images.
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
from numpy.lib.stride_tricks import as_strided

from shared.nn.geometry import SpecError, Window, make_window
from shared.nn.init import INITIALISERS, initialise

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

    def _kept(self, value: _Kept | None) -> _Kept:
        """`value`, kept by the last forward(training=True) for backward."""
        if value is None:
            raise RuntimeError(f"{self.type_name}: backward needs a forward with training=True first")
        return value


class Dense(Layer):
    """Affine layer y = x W + b on flat inputs."""

    type_name = "dense"

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
        return x @ self.params["W"] + self.params["b"]

    def backward(self, dout):
        self.grads = {"W": self._kept(self._x).T @ dout, "b": dout.sum(axis=0)}
        return dout @ self.params["W"].T


def _pad(x: np.ndarray, window: Window, value: float) -> np.ndarray:
    if not window.padded:
        return x
    return np.pad(
        x,
        ((0, 0), (0, 0), (window.pad_top, window.pad_bottom), (window.pad_left, window.pad_right)),
        constant_values=value,
    )


def _unpad(dx_padded: np.ndarray, window: Window) -> np.ndarray:
    h, w = dx_padded.shape[2:]
    return dx_padded[:, :, window.pad_top : h - window.pad_bottom, window.pad_left : w - window.pad_right]


def _tap(x_padded: np.ndarray, window: Window, i: int, j: int) -> np.ndarray:
    """The strided slice of x that kernel offset (i, j) sees at every output position."""
    sh, sw = window.stride
    return x_padded[:, :, i : i + sh * window.out_h : sh, j : j + sw * window.out_w : sw]


def _taps(window: Window):
    kh, kw = window.kernel
    return ((i, j) for i in range(kh) for j in range(kw))


class _WindowLayer(Layer):
    """Shared set-up of layers that slide a window over (C, H, W) inputs."""

    def __init__(self, input_shape, kernel_size, stride, padding):
        super().__init__(input_shape)
        if len(self.input_shape) != 3:
            raise SpecError(
                f"{self.type_name} needs (channels, height, width) inputs, got shape {self.input_shape}"
            )
        self.window = make_window(self.input_shape[1:], kernel_size, stride, padding)

    def _window_config(self):
        w = self.window
        padding = w.padding if isinstance(w.padding, str) else list(w.padding)
        return {"kernel_size": list(w.kernel), "stride": list(w.stride), "padding": padding}


class Conv2D(_WindowLayer):
    """2-D convolution (cross-correlation) by im2col and one matrix product.

    The columns are a zero-copy `as_strided` view of the padded input laid
    out as (c, kh, kw) x (n, oh, ow), made contiguous once: each row is a
    run of whole output rows, so gathering it copies long contiguous runs.
    The backward scatters columns back with one strided add per kernel
    offset (kh * kw slices; no loops over samples or pixels).
    """

    type_name = "conv2d"

    def __init__(
        self, input_shape, *, filters, kernel_size=3, stride=1, padding="valid", init="he", init_std=0.01
    ):
        super().__init__(input_shape, kernel_size, stride, padding)
        self.filters = positive_int("filters", filters)
        self.init = init_name(init)
        self.init_std = positive_float("init_std", init_std)
        self.output_shape = (self.filters, self.window.out_h, self.window.out_w)
        self._cols: np.ndarray | None = None
        self._padded_shape: tuple[int, ...] | None = None

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

    def _im2col(self, x_padded: np.ndarray) -> np.ndarray:
        """Rows are (c, kh, kw), columns are output positions (n, oh, ow)."""
        n, c = x_padded.shape[:2]
        w = self.window
        sn, sc, sh, sw = x_padded.strides
        view = as_strided(
            x_padded,
            shape=(c, *w.kernel, n, w.out_h, w.out_w),
            strides=(sc, sh, sw, sn, sh * w.stride[0], sw * w.stride[1]),
            writeable=False,
        )
        return view.reshape(c * w.kernel[0] * w.kernel[1], -1)

    def forward(self, x, training=True):
        x_padded = _pad(x, self.window, 0)
        cols = self._im2col(x_padded)
        out = self.params["W"].reshape(self.filters, -1) @ cols
        out += self.params["b"][:, None]
        if training:
            self._cols, self._padded_shape = cols, x_padded.shape
        out = out.reshape(self.filters, x.shape[0], self.window.out_h, self.window.out_w)
        # Contiguous NCHW, so the next layers' elementwise work runs at full speed.
        return np.ascontiguousarray(out.transpose(1, 0, 2, 3))

    def backward(self, dout):
        n = dout.shape[0]
        dout_rows = dout.transpose(1, 0, 2, 3).reshape(self.filters, -1)
        weights = self.params["W"].reshape(self.filters, -1)
        self.grads = {
            "W": (dout_rows @ self._kept(self._cols).T).reshape(self.params["W"].shape),
            "b": dout_rows.sum(axis=1),
        }
        dcols = (weights.T @ dout_rows).reshape(
            self.input_shape[0], *self.window.kernel, n, self.window.out_h, self.window.out_w
        )
        dx_padded = np.zeros(self._kept(self._padded_shape), dtype=dout.dtype)
        dx_channels_first = dx_padded.transpose(1, 0, 2, 3)
        for i, j in _taps(self.window):
            _tap(dx_channels_first, self.window, i, j)[...] += dcols[:, i, j]
        return _unpad(dx_padded, self.window)


class _Pool2D(_WindowLayer):
    """Pooling settings: a `size` x `size` window moving by `stride` (default: size)."""

    def __init__(self, input_shape, *, size=2, stride=None, padding="valid"):
        super().__init__(input_shape, size, size if stride is None else stride, padding)
        self.output_shape = (self.input_shape[0], self.window.out_h, self.window.out_w)

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

    Padding counts as -inf, so it never wins. The backward routes each
    output's gradient to the first maximum of its window (ties go to one
    input, as an argmax would).
    """

    type_name = "maxpool2d"

    def forward(self, x, training=True):
        x_padded = _pad(x, self.window, -np.inf)
        taps = _taps(self.window)
        out = _tap(x_padded, self.window, *next(taps)).copy()
        for i, j in taps:
            np.maximum(out, _tap(x_padded, self.window, i, j), out=out)
        if training:
            self._x_padded, self._out = x_padded, out
        return out

    def backward(self, dout):
        dx_padded = np.zeros(self._x_padded.shape, dtype=dout.dtype)
        routed = np.zeros(self._out.shape, dtype=bool)
        for i, j in _taps(self.window):
            is_max = _tap(self._x_padded, self.window, i, j) == self._out
            is_max &= ~routed
            routed |= is_max
            _tap(dx_padded, self.window, i, j)[...] += dout * is_max
        return _unpad(dx_padded, self.window)


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
        ones = np.ones((1, 1, *self.input_shape[1:]))
        return self._window_sum(_pad(ones, self.window, 0))[0, 0]

    def _window_sum(self, x_padded):
        taps = _taps(self.window)
        total = _tap(x_padded, self.window, *next(taps)).copy()
        for i, j in taps:
            total += _tap(x_padded, self.window, i, j)
        return total

    def forward(self, x, training=True):
        x_padded = _pad(x, self.window, 0)
        if training:
            self._padded_shape = x_padded.shape
        return self._window_sum(x_padded) / self._count.astype(x.dtype)

    def backward(self, dout):
        share = dout / self._count.astype(dout.dtype)
        dx_padded = np.zeros(self._padded_shape, dtype=dout.dtype)
        for i, j in _taps(self.window):
            _tap(dx_padded, self.window, i, j)[...] += share
        return _unpad(dx_padded, self.window)


class Flatten(Layer):
    type_name = "flatten"

    def __init__(self, input_shape):
        super().__init__(input_shape)
        self.output_shape = (math.prod(self.input_shape),)  # Python ints: no overflow

    def forward(self, x, training=True):
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(dout.shape[0], *self.input_shape)


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
