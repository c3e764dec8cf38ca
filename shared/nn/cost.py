"""What a model will cost before it exists: its parameter count and an estimate of training memory.

Both come from the shapes that `build_model` infers (a built model has no
arrays until it is initialised), so a service can refuse a model that
would exhaust its memory at the price of reading the spec. All arithmetic
is on Python ints: a hostile size cannot overflow.

The memory estimate is an upper bound of the arrays one training step and
one evaluation pass hold at the same time, not a measurement:

- per parameter: the weights, their gradient, each optimiser slot, the
  optimiser's work array (as large as the largest parameter; counted as
  one more copy of all of them), and the copies a checkpoint publish makes
  (a snapshot of weights and optimiser state, and the encoded blob);
- per buffer element (BatchNorm's running statistics): the live array and
  a publish's snapshot and blob;
- per sample of a training batch: every layer's input and output (each
  layer keeps what its backward needs, and backward makes gradients of the
  same sizes) and, for a convolution, its im2col columns (with their row
  of ones for the bias) twice: the forward's and the backward's buffers;
  for BatchNorm and Dropout, one more array of the input's size (the
  normalised input, the mask) that they keep beside their output;
- evaluation runs forward passes of up to EVAL_BATCH samples; it does not
  overlap a training step, so the larger of the two counts.
"""

from __future__ import annotations

import math

import numpy as np

from shared.nn.fit import EVAL_BATCH
from shared.nn.layers import BatchNorm, Conv2D, Dropout
from shared.nn.model import Model


def parameter_count(model: Model) -> int:
    return sum(math.prod(shape) for shape in model.param_shapes().values())


def buffer_count(model: Model) -> int:
    return sum(math.prod(shape) for shape in model.buffer_shapes().values())


def _columns(layer) -> int:
    """Elements of a convolution's im2col columns per sample (0 for other layers)."""
    if not isinstance(layer, Conv2D):
        return 0
    return (layer.rows + 1) * layer.window.out_h * layer.window.out_w


def _kept(layer) -> int:
    """Elements per sample a layer keeps for backward beyond its input and output."""
    return math.prod(layer.input_shape) if isinstance(layer, (BatchNorm, Dropout)) else 0


def _per_sample(layer) -> int:
    return math.prod(layer.input_shape) + math.prod(layer.output_shape) + 2 * _columns(layer) + _kept(layer)


def training_memory_bytes(model: Model, batch_size: int, optimizer_slots: int) -> int:
    """Estimated peak bytes of training `model` at `batch_size` (see the module docstring)."""
    itemsize = np.dtype(model.dtype).itemsize
    copies_per_parameter = 2 + optimizer_slots + 1 + (1 + optimizer_slots) + 1
    parameters = parameter_count(model) * copies_per_parameter + buffer_count(model) * 3
    training = batch_size * sum(_per_sample(layer) for layer in model.layers)
    evaluating = EVAL_BATCH * max(
        math.prod(layer.input_shape) + math.prod(layer.output_shape) + _columns(layer)
        for layer in model.layers
    )
    return itemsize * (parameters + max(training, evaluating))
