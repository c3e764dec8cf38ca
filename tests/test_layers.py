"""Every layer against the numerical gradient (float64), a naive reference, and its contract."""

import itertools

import numpy as np
import pytest

from shared.nn import SpecError, build_model, eval_numerical_gradient_array, numerical_gradient, rel_error
from shared.nn.layers import (
    GELU,
    LAYER_TYPES,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Tanh,
)
from shared.nn.losses import SoftmaxCrossEntropy, log_softmax, softmax

TOLERANCE = 1e-6


def built(layer, dtype=np.float64, seed=0):
    layer.initialise(np.random.default_rng(seed), np.dtype(dtype))
    if isinstance(layer, Dropout):  # as Model.train_step_gradients would set it
        layer.generator = np.random.default_rng(seed)
    return layer


def training_forward(layer, seed=0):
    """layer.forward in training, drawing the same dropout mask at every call."""

    def forward(x):
        if isinstance(layer, Dropout):
            layer.generator = np.random.default_rng(seed)
        return layer.forward(x)

    return forward


def check_layer_gradients(layer, x, seed=1) -> dict[str, float]:
    """Backprop against central differences for the input and every parameter; the errors by name."""
    rng = np.random.default_rng(seed)
    forward = training_forward(layer)
    out = forward(x)
    assert out.shape[1:] == layer.output_shape
    upstream = rng.standard_normal(out.shape)
    dx = layer.backward(upstream)

    errors = {"x": rel_error(dx, eval_numerical_gradient_array(forward, x, upstream))}
    for name, param in layer.params.items():
        numeric = eval_numerical_gradient_array(lambda _: forward(x), param, upstream)
        errors[name] = rel_error(layer.grads[name], numeric)
    assert max(errors.values()) < TOLERANCE, errors
    return errors


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
    lambda: GlobalAvgPool((2, 5, 4)),
    lambda: BatchNorm((12,)),
    lambda: BatchNorm((2, 5, 4)),
    lambda: Dropout((2, 5, 4), rate=0.5),
    lambda: LeakyReLU((12,)),
    lambda: GELU((12,)),
    lambda: GELU((2, 5, 4), approximate="tanh"),
]


def test_the_contract_tests_cover_every_layer_type():
    assert {make().type_name for make in ALL_LAYERS} == set(LAYER_TYPES)


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
        lambda: GlobalAvgPool((2, 6, 6)),
        lambda: BatchNorm((2, 6, 6)),
        lambda: Dropout((2, 6, 6), rate=0.3),
        lambda: LeakyReLU((2, 6, 6)),
        lambda: GELU((2, 6, 6)),
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
        out = training_forward(layer)(x_in)
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


# ------------------------------------------- batchnorm, dropout, global pooling, leaky ReLU, GELU


def with_random_affine(layer: BatchNorm, seed=3) -> BatchNorm:
    """gamma and beta away from 1 and 0, so their gradients check something."""
    rng = np.random.default_rng(seed)
    layer.params = {name: rng.standard_normal(p.shape) for name, p in layer.params.items()}
    return layer


@pytest.mark.parametrize(
    "layer",
    [
        with_random_affine(built(BatchNorm((5,)))),
        with_random_affine(built(BatchNorm((3, 4, 5), momentum=0.5, eps=1e-3))),
        built(Dropout((6,), rate=0.4)),
        built(Dropout((2, 3, 3), rate=0.0)),
        GlobalAvgPool((3, 4, 5)),
        LeakyReLU((7,)),
        LeakyReLU((2, 3, 3), negative_slope=0.3),
        GELU((7,)),
        GELU((2, 3, 3), approximate="tanh"),
    ],
    ids=lambda layer: f"{layer.type_name}{list(layer.input_shape)}",
)
def test_new_layer_gradients_in_training_mode(layer):
    """BatchNorm with batch statistics, Dropout with one fixed mask: input and every parameter."""
    x = np.random.default_rng(6).standard_normal((6, *layer.input_shape))
    if isinstance(layer, LeakyReLU):  # clear of the kink at 0
        x[np.abs(x) < 1e-3] = 0.5
    check_layer_gradients(layer, x)


def test_batchnorm_normalises_per_channel_and_moves_its_running_statistics_as_pytorch():
    layer = built(BatchNorm((3, 4, 5), momentum=0.25))
    x = np.random.default_rng(12).normal(2.0, 3.0, (6, 3, 4, 5))
    out = layer.forward(x)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), 1, rtol=1e-4)  # var / (var + eps)
    per_channel = x.transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.25 * per_channel.mean(axis=1))
    np.testing.assert_allclose(layer.buffers["running_var"], 0.75 + 0.25 * per_channel.var(axis=1, ddof=1))

    evaluated = layer.forward(x, training=False)
    running = {name: b.reshape(1, 3, 1, 1) for name, b in layer.buffers.items()}
    np.testing.assert_allclose(
        evaluated, (x - running["running_mean"]) / np.sqrt(running["running_var"] + 1e-5), rtol=1e-12
    )


def test_batchnorm_leaves_its_running_statistics_for_a_batch_of_one_value_per_channel():
    layer = built(BatchNorm((4,)))
    out = layer.forward(np.arange(4.0)[None])
    np.testing.assert_array_equal(out, np.zeros((1, 4)))  # normalised by its own statistics: beta
    np.testing.assert_array_equal(layer.buffers["running_mean"], np.zeros(4))
    np.testing.assert_array_equal(layer.buffers["running_var"], np.ones(4))


def test_batchnorm_matches_pytorch_in_training_and_evaluation():
    torch = pytest.importorskip(
        "torch", reason="torch (a benchmark peer, not in the dev lock) is not installed"
    )
    rng = np.random.default_rng(13)
    for shape, module in (((5,), torch.nn.BatchNorm1d(5)), ((3, 4, 4), torch.nn.BatchNorm2d(3))):
        ours = with_random_affine(built(BatchNorm(shape)))
        module.double().train()
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(ours.params["gamma"]))
            module.bias.copy_(torch.from_numpy(ours.params["beta"]))
        for _ in range(3):
            x = rng.normal(1.0, 2.0, (8, *shape))
            with torch.no_grad():
                expected = module(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(ours.forward(x), expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours.buffers["running_mean"], module.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(ours.buffers["running_var"], module.running_var.numpy(), rtol=1e-12)
        module.eval()
        x = rng.normal(1.0, 2.0, (4, *shape))
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours.forward(x, training=False), expected, rtol=1e-10, atol=1e-12)


def test_dropout_is_inverted_in_training_and_the_identity_at_evaluation():
    layer = built(Dropout((1000,), rate=0.25), np.float32)
    x = np.ones((20, 1000), dtype=np.float32)
    out = layer.forward(x)
    assert out.dtype == np.float32
    assert set(np.unique(out)) == {0, np.float32(1 / 0.75)}
    assert abs((out == 0).mean() - 0.25) < 0.01
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), out)  # the mask, scale included
    assert layer.forward(x, training=False) is x


def test_dropout_draws_its_mask_from_its_generator_alone():
    x = np.ones((4, 50))
    first, second = (built(Dropout((50,), rate=0.5), seed=5).forward(x) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, built(Dropout((50,), rate=0.5), seed=6).forward(x))
    with pytest.raises(RuntimeError, match="generator"):
        Dropout((50,), rate=0.5).forward(x)


def test_global_average_pooling_is_the_mean_of_each_channel():
    x = np.random.default_rng(14).standard_normal((2, 3, 4, 5))
    np.testing.assert_allclose(GlobalAvgPool((3, 4, 5)).forward(x), x.reshape(2, 3, -1).mean(axis=2))


def test_leaky_relu_scales_the_negative_side():
    out = LeakyReLU((3,), negative_slope=0.1).forward(np.array([[-2.0, 0.0, 3.0]]))
    np.testing.assert_array_equal(out, [[-0.2, 0.0, 3.0]])


def test_erf_agrees_with_math_erf_on_a_grid():
    import math

    from shared.nn.special import erf

    grid = np.concatenate([np.linspace(-10, 10, 40001), [0.0, -0.0, 1.9999999, 2.0, -2.0, 30.0, -30.0]])
    reference = np.array([math.erf(v) for v in grid])
    assert np.max(np.abs(erf(grid) - reference)) < 1e-15
    assert erf(np.array([0.5], dtype=np.float32)).dtype == np.float64


def test_gelu_matches_its_definition_and_pytorch():
    import math

    x = np.linspace(-6, 6, 1201)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(GELU((1201,)).forward(x[None])[0], exact, rtol=1e-14, atol=1e-15)
    torch = pytest.importorskip(
        "torch", reason="torch (a benchmark peer, not in the dev lock) is not installed"
    )
    for approximate in ("none", "tanh"):
        expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate=approximate).numpy()
        ours = GELU((1201,), approximate=approximate).forward(x[None])[0]
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-14)
        ours32 = GELU((1201,), approximate=approximate).forward(x[None].astype(np.float32))[0]
        expected32 = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float32)), approximate=approximate)
        np.testing.assert_allclose(ours32, expected32.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Dropout((4,), rate=1.0), "rate must be a number in [0, 1), got 1.0"),
        (lambda: Dropout((4,), rate=-0.1), "rate must be a number in [0, 1)"),
        (lambda: Dropout((4,), rate=float("nan")), "rate must be a number in [0, 1), got nan"),
        (lambda: Dropout((4,), rate=True), "rate must be a number"),
        (lambda: BatchNorm((4,), momentum=0), "momentum must be a number in (0, 1], got 0"),
        (lambda: BatchNorm((4,), momentum=1.5), "momentum must be a number in (0, 1]"),
        (lambda: BatchNorm((4,), eps=0), "eps must be a finite number above 0"),
        (lambda: BatchNorm((4,), eps=float("inf")), "eps must be a finite number above 0"),
        (lambda: BatchNorm((4, 4)), "batchnorm normalises (features,) or (channels, height, width)"),
        (lambda: GlobalAvgPool((8,)), "samples of shape (8,) have none"),
        (lambda: LeakyReLU((4,), negative_slope=-0.1), "negative_slope must be a number in [0, 1)"),
        (lambda: GELU((4,), approximate="sigmoid"), "approximate must be one of ['none', 'tanh']"),
    ],
)
def test_new_layer_settings_that_cannot_work_are_refused(make, message):
    with pytest.raises(SpecError) as refused:
        make()
    assert message in str(refused.value)
