"""Every layer against the numerical gradient (float64), a naive reference, and its contract."""

import itertools

import numpy as np
import pytest

from shared.nn import SpecError, build_model, eval_numerical_gradient_array, numerical_gradient, rel_error
from shared.nn.layers import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sigmoid, Tanh
from shared.nn.losses import SoftmaxCrossEntropy, log_softmax, softmax

TOLERANCE = 1e-6


def built(layer, dtype=np.float64, seed=0):
    layer.initialise(np.random.default_rng(seed), np.dtype(dtype))
    return layer


def check_layer_gradients(layer, x, seed=1):
    """Backprop against central differences for the input and every parameter."""
    rng = np.random.default_rng(seed)
    out = layer.forward(x)
    assert out.shape[1:] == layer.output_shape
    upstream = rng.standard_normal(out.shape)
    dx = layer.backward(upstream)

    numeric_dx = eval_numerical_gradient_array(layer.forward, x, upstream)
    assert rel_error(dx, numeric_dx) < TOLERANCE
    for name, param in layer.params.items():
        numeric = eval_numerical_gradient_array(lambda _: layer.forward(x), param, upstream)
        assert rel_error(layer.grads[name], numeric) < TOLERANCE, name


def naive_conv(x, w, b, stride, pads):
    """Direct loops: the definition of cross-correlation, for reference."""
    (top, bottom), (left, right) = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, _, h, wd = x.shape
    f, _, kh, kw = w.shape
    oh, ow = (h - kh) // stride[0] + 1, (wd - kw) // stride[1] + 1
    out = np.zeros((n, f, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * stride[0] : i * stride[0] + kh, j * stride[1] : j * stride[1] + kw]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


CONV_CASES = [
    # input (C, H, W), options, expected explicit pads ((top, bottom), (left, right))
    ((2, 7, 7), dict(kernel_size=3, stride=1, padding="same"), ((1, 1), (1, 1))),
    ((2, 7, 7), dict(kernel_size=3, stride=2, padding="same"), ((1, 1), (1, 1))),
    ((2, 6, 6), dict(kernel_size=2, stride=1, padding="same"), ((0, 1), (0, 1))),  # TF: extra at bottom/right
    ((2, 8, 8), dict(kernel_size=3, stride=2, padding="same"), ((0, 1), (0, 1))),
    ((2, 7, 6), dict(kernel_size=3, stride=1, padding="valid"), ((0, 0), (0, 0))),
    ((2, 7, 7), dict(kernel_size=3, stride=2, padding=1), ((1, 1), (1, 1))),
    ((3, 6, 7), dict(kernel_size=[2, 3], stride=[1, 2], padding=[0, 1]), ((0, 0), (1, 1))),
    ((2, 5, 5), dict(kernel_size=3, stride=1, padding=2), ((2, 2), (2, 2))),  # windows of padding only
    ((2, 7, 7), dict(kernel_size=2, stride=3, padding="valid"), ((0, 0), (0, 0))),  # inputs never read
]


@pytest.mark.parametrize("shape, options, pads", CONV_CASES)
def test_conv_matches_the_definition_and_its_gradient(shape, options, pads):
    layer = built(Conv2D(shape, filters=3, **options))
    layer.params["b"] = np.random.default_rng(2).standard_normal(3)
    x = np.random.default_rng(3).standard_normal((2, *shape))
    stride = layer.window.stride
    expected = naive_conv(x, layer.params["W"], layer.params["b"], stride, pads)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-10, atol=1e-12)
    check_layer_gradients(layer, x)


def test_conv_output_size_follows_the_formula():
    # o = floor((i - f + 2p) / s) + 1
    layer = Conv2D((1, 28, 28), filters=4, kernel_size=5, stride=3, padding=2)
    assert layer.output_shape == (4, (28 - 5 + 4) // 3 + 1, (28 - 5 + 4) // 3 + 1)
    assert Conv2D((1, 28, 28), filters=4, kernel_size=3, stride=2, padding="same").output_shape == (4, 14, 14)


POOL_CASES = [
    ((2, 6, 6), dict(size=2)),
    ((2, 7, 7), dict(size=2)),  # odd input, valid: last row dropped
    ((2, 7, 7), dict(size=3, stride=2)),
    ((2, 7, 7), dict(size=3, stride=1, padding="same")),
    ((2, 5, 5), dict(size=2, stride=2, padding="same")),
    ((2, 6, 6), dict(size=3, stride=2, padding=1)),
    ((2, 7, 7), dict(size=2, stride=3)),  # inputs in no window
    ((2, 6, 5), dict(size=[3, 2], stride=[1, 2], padding="same")),  # overlapping rows only
]


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("shape, options", POOL_CASES)
def test_pooling_gradients(cls, shape, options):
    layer = cls(shape, **options)
    x = np.random.default_rng(4).standard_normal((3, *shape))
    check_layer_gradients(layer, x)


def reference_pool(x, size, stride, pads, reduce):
    """Loops over output pixels; padding excluded from both max and mean."""
    (top, bottom), (left, right) = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=np.nan)
    oh, ow = (x.shape[2] - size) // stride + 1, (x.shape[3] - size) // stride + 1
    out = np.zeros((*x.shape[:2], oh, ow))
    for i in range(oh):
        for j in range(ow):
            window = x[:, :, i * stride : i * stride + size, j * stride : j * stride + size]
            out[:, :, i, j] = reduce(window.reshape(*x.shape[:2], -1), axis=2)
    return out


@pytest.mark.parametrize("cls, reduce", [(MaxPool2D, np.nanmax), (AvgPool2D, np.nanmean)])
def test_pooling_matches_reference_with_padding(cls, reduce):
    layer = cls((2, 5, 5), size=2, stride=2, padding="same")
    assert layer.output_shape == (2, 3, 3)  # padding counts in the output size
    x = np.random.default_rng(5).standard_normal((2, 2, 5, 5))
    expected = reference_pool(x, 2, 2, ((0, 1), (0, 1)), reduce)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12)


def test_maxpool_routes_a_tie_to_one_input():
    layer = MaxPool2D((1, 2, 2), size=2)
    layer.forward(np.ones((1, 1, 2, 2)))
    dx = layer.backward(np.ones((1, 1, 1, 1)))
    assert dx.sum() == 1 and dx.max() == 1


@pytest.mark.parametrize(
    "layer",
    [
        Dense((6,), units=4),
        Dense((5,), units=3, init="xavier"),
        ReLU((3, 4)),
        Sigmoid((7,)),
        Tanh((2, 3, 3)),
        Flatten((2, 3, 3)),
    ],
    ids=lambda layer: layer.type_name,
)
def test_simple_layer_gradients(layer):
    built(layer)
    x = np.random.default_rng(6).standard_normal((4, *layer.input_shape))
    if isinstance(layer, ReLU):  # keep clear of the kink at 0, where no derivative exists
        x[np.abs(x) < 1e-3] = 0.5
    check_layer_gradients(layer, x)


def test_sigmoid_is_stable_for_large_inputs():
    out = Sigmoid((3,)).forward(np.array([[-1000.0, 0.0, 1000.0]], dtype=np.float32))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0.0, 0.5, 1.0]])


ALL_LAYERS = [
    lambda: Dense((12,), units=5),
    lambda: Conv2D((2, 6, 6), filters=3, kernel_size=3, stride=2, padding="same"),
    lambda: MaxPool2D((2, 6, 6), size=3, stride=2, padding="same"),
    lambda: AvgPool2D((2, 6, 6), size=2, padding=1),
    lambda: Flatten((2, 6, 6)),
    lambda: ReLU((12,)),
    lambda: Sigmoid((12,)),
    lambda: Tanh((12,)),
]


@pytest.mark.parametrize("make", ALL_LAYERS)
def test_float32_stays_float32_and_upstream_gradient_is_untouched(make):
    layer = built(make(), np.float32)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, *layer.input_shape)).astype(np.float32)
    out = layer.forward(x)
    assert out.dtype == np.float32
    upstream = rng.standard_normal(out.shape).astype(np.float32)
    kept = upstream.copy()
    dx = layer.backward(upstream)
    assert dx.dtype == np.float32 and dx.shape == x.shape
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    np.testing.assert_array_equal(upstream, kept)


def batch_last_copy(x):
    """The same batch, held (c, h, w, n) in memory as the layers pass images on."""
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Conv2D((2, 6, 6), filters=3, kernel_size=3, stride=1, padding="same"),
        lambda: Conv2D((2, 7, 7), filters=3, kernel_size=3, stride=2, padding=1),
        lambda: MaxPool2D((2, 6, 6), size=2),
        lambda: MaxPool2D((2, 7, 7), size=3, stride=2, padding="same"),
        lambda: AvgPool2D((2, 6, 6), size=2),
        lambda: ReLU((2, 6, 6)),
        lambda: Flatten((2, 6, 6)),
    ],
    ids=lambda make: make().type_name,
)
def test_window_layers_give_the_same_for_every_memory_layout(make):
    """Forward and backward agree to the bit whether the batch and the incoming gradient
    are NCHW or batch-last in memory, and in any mix of the two."""
    layer = built(make())
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, *layer.input_shape))
    dout = rng.standard_normal((4, *layer.output_shape))
    results = []
    douts = [dout, batch_last_copy(dout)] if dout.ndim == 4 else [dout]
    for x_in, dout_in in itertools.product([x, batch_last_copy(x)], douts):
        out = layer.forward(x_in)
        dx = layer.backward(dout_in)
        results.append((out, dx, {k: g.copy() for k, g in layer.grads.items()}))
    for out, dx, grads in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(dx, results[0][1])
        for name, grad in grads.items():
            np.testing.assert_array_equal(grad, results[0][2][name])


def test_flatten_hands_the_gradient_back_in_the_layout_of_its_input():
    layer = Flatten((2, 3, 3))
    for x in (np.ones((4, 2, 3, 3)), batch_last_copy(np.ones((4, 2, 3, 3)))):
        layer.forward(x)
        assert layer.backward(np.ones((4, 18))).strides == x.strides


def test_conv_training_buffers_follow_the_batch_size_and_inference_leaves_them_alone():
    """Training keeps im2col buffers from step to step; a batch of another size, or an
    inference pass in between, must not change what a training step computes."""
    layer = built(Conv2D((2, 6, 6), filters=3, kernel_size=3, stride=2, padding="same"))
    rng = np.random.default_rng(10)
    batches = [rng.standard_normal((n, 2, 6, 6)) for n in (3, 2, 3)]
    douts = [rng.standard_normal((len(x), *layer.output_shape)) for x in batches]

    def step(x, dout):
        out = layer.forward(x)
        return out, layer.backward(dout), layer.grads["W"].copy()

    fresh = [step(x, dout) for x, dout in zip(batches, douts, strict=True)]
    for (x, dout), expected in zip(zip(batches, douts, strict=True), fresh, strict=True):
        out = layer.forward(x)
        layer.forward(rng.standard_normal((5, 2, 6, 6)), training=False)
        dx = layer.backward(dout)
        np.testing.assert_array_equal(out, expected[0])
        np.testing.assert_array_equal(dx, expected[1])
        np.testing.assert_array_equal(layer.grads["W"], expected[2])
        reference = naive_conv(x, layer.params["W"], layer.params["b"], (2, 2), ((0, 1), (0, 1)))
        np.testing.assert_allclose(out, reference, rtol=1e-10, atol=1e-12)


def test_a_models_first_layer_skips_its_input_gradient_only():
    """Model.backward stops at the first layer with parameters; the parameter gradients are
    those of a backward through every layer, down to the input."""
    spec = {
        "input_shape": [1, 6, 6],
        "layers": [
            {"type": "conv2d", "filters": 2, "padding": "same"},
            {"type": "relu"},
            {"type": "flatten"},
            {"type": "dense", "units": 3},
        ],
    }
    model = build_model(spec, dtype=np.float64).initialise(0)
    x = np.random.default_rng(11).standard_normal((4, 1, 6, 6))
    model.train_step_gradients(x, np.array([0, 1, 2, 1]))
    skipped = {k: v.copy() for k, v in model.gradients().items()}
    grad = model.loss.backward()
    for layer in reversed(model.layers):
        grad = layer.backward(grad)
    assert grad.shape == x.shape
    assert model.gradients().keys() == skipped.keys()
    for name, full in model.gradients().items():
        np.testing.assert_array_equal(full, skipped[name])


def test_inference_forward_keeps_nothing_for_backward():
    layer = built(Conv2D((1, 5, 5), filters=2))
    layer.forward(np.zeros((1, 1, 5, 5)), training=False)
    assert layer._cols is None


def test_loss_gradient_and_stability():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    loss = SoftmaxCrossEntropy()
    loss.forward(logits, labels)
    analytic = loss.backward()
    numeric = numerical_gradient(lambda: SoftmaxCrossEntropy().forward(logits, labels), logits)
    assert rel_error(analytic, numeric) < TOLERANCE

    huge = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    assert np.isfinite(SoftmaxCrossEntropy().forward(huge, np.array([2])))
    assert np.allclose(softmax(huge), [[1, 0, 0]]) and softmax(huge).dtype == np.float32
    np.testing.assert_allclose(np.exp(log_softmax(logits)).sum(axis=1), 1.0)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: Conv2D((1, 4, 4), filters=2, kernel_size=5),
            "kernel 5x5 is larger than the padded input 4x4",
        ),
        (lambda: Conv2D((1, 4, 4), filters=0), "filters must be a positive int"),
        (lambda: Conv2D((1, 4, 4), filters=2, padding="full"), "padding must be 'same', 'valid' or an int"),
        (lambda: Conv2D((1, 4, 4), filters=2, stride=0), "stride must be >= 1"),
        (lambda: Dense((2, 3, 3), units=4), "put a flatten layer before it"),
        (lambda: Dense((4,), units=0), "units must be a positive int"),
        (lambda: Dense((4,), units=3, init="zeros"), "init must be one of"),
        (lambda: MaxPool2D((8,), size=2), "needs (channels, height, width) inputs"),
    ],
)
def test_layer_settings_that_cannot_work_are_refused(make, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()
