"""Specs: shape inference, one clear error for a spec that cannot work, stable normal form."""

import json

import numpy as np
import pytest

from shared.nn import SpecError, build_model, numerical_gradient, rel_error, spec_to_json
from shared.nn.presets import PRESETS, get_preset

SMALL_CNN = {
    "input_shape": [2, 7, 7],
    "layers": [
        {"type": "conv2d", "filters": 3, "kernel_size": 3, "stride": 2, "padding": "same"},
        {"type": "tanh"},
        {"type": "avgpool2d", "size": 2, "padding": "same"},
        {"type": "conv2d", "filters": 2, "kernel_size": 2, "padding": "same"},
        {"type": "relu"},
        {"type": "maxpool2d", "size": 2, "stride": 1},
        {"type": "flatten"},
        {"type": "dense", "units": 5, "init": "xavier"},
        {"type": "sigmoid"},
        {"type": "dense", "units": 3},
    ],
}


def assert_backprop_matches_numerical_gradient(spec) -> None:
    model = build_model(spec, dtype=np.float64).initialise(0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, *model.input_shape))
    y = np.array([0, 1, 2, 1])
    model.train_step_gradients(x, y, step_seed=(0, 0))
    analytic = {k: v.copy() for k, v in model.gradients().items()}

    def loss():  # in training mode, with the same dropout masks every time
        return model.train_step_gradients(x, y, step_seed=(0, 0))[0]

    for name, param in model.parameters().items():
        assert rel_error(analytic[name], numerical_gradient(loss, param)) < 1e-6, name


def test_whole_models_backprop_matches_numerical_gradient():
    for spec in (SMALL_CNN, get_preset("two-layer-net").spec((1, 4, 4), 3, hidden=(6,))):
        assert_backprop_matches_numerical_gradient(spec)


def test_shapes_are_inferred_through_the_stack():
    model = build_model(get_preset("cnn").spec((1, 28, 28), 10))
    assert [layer.output_shape for layer in model.layers] == [
        (32, 28, 28),
        (32, 28, 28),
        (32, 14, 14),
        (64, 14, 14),
        (64, 14, 14),
        (64, 7, 7),
        (3136,),
        (128,),
        (128,),
        (10,),
    ]
    assert model.param_shapes()["layers.7.W"] == (3136, 128)


def test_normal_form_is_complete_stable_and_json():
    model = build_model(SMALL_CNN)
    normal = model.spec
    assert normal["layers"][0] == {
        "type": "conv2d",
        "filters": 3,
        "kernel_size": [3, 3],
        "stride": [2, 2],
        "padding": "same",
        "init": "he",
        "init_std": 0.01,
    }
    assert normal["layers"][5] == {"type": "maxpool2d", "size": [2, 2], "stride": [1, 1], "padding": "valid"}
    assert build_model(json.loads(spec_to_json(normal))).spec == normal


def bad(layers, input_shape=(1, 8, 8)):
    return {"input_shape": list(input_shape), "layers": layers}


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            bad(
                [
                    {"type": "conv2d", "filters": 4, "kernel_size": 9},
                    {"type": "flatten"},
                    {"type": "dense", "units": 2},
                ]
            ),
            (
                r"layer 0 \(conv2d\) with input shape \(1, 8, 8\): "
                r"kernel 9x9 is larger than the padded input 8x8"
            ),
        ),
        (
            bad([{"type": "conv2d", "filters": 4}, {"type": "dense", "units": 2}]),
            r"layer 1 \(dense\) with input shape \(4, 6, 6\): dense needs flat samples",
        ),
        (
            bad([{"type": "flatten"}, {"type": "dense", "units": 0}]),
            r"layer 1 \(dense\) with input shape \(64,\): units must be a positive int, got 0",
        ),
        (bad([{"type": "flatten"}, {"type": "dropconnect"}]), r"layer 1 \(dropconnect\): unknown layer type"),
        (
            bad([{"type": "flatten"}, {"type": "dense", "units": 3, "activation": "relu"}]),
            r"layer 1 \(dense\): unknown options \['activation'\]",
        ),
        (
            bad([{"type": "flatten"}, {"type": "dense"}]),
            r"layer 1 \(dense\): missing required options \['units'\]",
        ),
        (bad([{"type": "relu"}]), r"the last layer \(0, relu\) outputs shape \(1, 8, 8\)"),
        (
            bad(
                [{"type": "maxpool2d", "size": 2}] * 4 + [{"type": "flatten"}, {"type": "dense", "units": 2}]
            ),
            r"layer 3 \(maxpool2d\) with input shape \(1, 1, 1\): kernel 2x2 is larger",
        ),
        (bad([], input_shape=(8, 8)), r"input_shape must be \[features\] or \[channels, height, width\]"),
        (
            {"input_shape": [4], "layers": [{"type": "dense", "units": 2}], "loss": "mse"},
            r"unknown spec keys \['loss'\]",
        ),
        ("dense", r"a spec must be an object"),
    ],
)
def test_a_spec_that_cannot_work_is_refused_with_one_clear_error(spec, expected):
    with pytest.raises(SpecError, match=expected):
        build_model(spec)


def test_every_preset_builds_for_digits_and_mnist_shapes():
    for preset in PRESETS.values():
        for shape in ((1, 8, 8), (1, 28, 28)):
            assert build_model(preset.spec(shape, 10)).num_classes == 10


def test_preset_errors_name_the_problem():
    with pytest.raises(LookupError, match="unknown preset 'resnet'"):
        get_preset("resnet")
    with pytest.raises(ValueError, match="hidden must list 1 width"):
        get_preset("digits-cnn").spec((1, 8, 8), 10, hidden=(10, 20))
    assert len(build_model(get_preset("mlp").spec((4,), 3, hidden=(5, 6, 7, 8))).layers) == 10
