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


EVERY_NEW_LAYER = {
    "input_shape": [2, 6, 6],
    "layers": [
        {"type": "conv2d", "filters": 3, "padding": "same"},
        {"type": "batchnorm"},
        {"type": "leaky_relu", "negative_slope": 0.1},
        {"type": "dropout", "rate": 0.25},
        {"type": "global_avgpool"},
        {"type": "batchnorm", "momentum": 0.2, "eps": 1e-3},
        {"type": "gelu"},
        {"type": "dense", "units": 4},
        {"type": "gelu", "approximate": "tanh"},
        {"type": "dense", "units": 3},
    ],
}


def test_new_layers_infer_shapes_fill_defaults_and_backprop_through_a_whole_model():
    model = build_model(EVERY_NEW_LAYER)
    assert [layer.output_shape for layer in model.layers[3:6]] == [(3, 6, 6), (3,), (3,)]
    configs = model.spec["layers"]
    assert configs[1] == {"type": "batchnorm", "momentum": 0.1, "eps": 1e-5}
    assert configs[2] == {"type": "leaky_relu", "negative_slope": 0.1}
    assert configs[6] == {"type": "gelu", "approximate": "none"}
    assert model.buffer_shapes() == {
        "layers.1.running_mean": (3,),
        "layers.1.running_var": (3,),
        "layers.5.running_mean": (3,),
        "layers.5.running_var": (3,),
    }
    assert {"layers.1.gamma", "layers.1.beta"} <= model.param_shapes().keys()
    assert spec_to_json(build_model(model.spec).spec) == spec_to_json(model.spec)
    assert_backprop_matches_numerical_gradient(EVERY_NEW_LAYER)


def with_layer(layer: dict, input_shape=(1, 8, 8)) -> dict:
    return {
        "input_shape": list(input_shape),
        "layers": [layer, {"type": "flatten"}, {"type": "dense", "units": 2}],
    }


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            with_layer({"type": "dropout", "rate": -0.5}),
            r"layer 0 \(dropout\) .*rate must be a number in \[0, 1\)",
        ),
        (
            with_layer({"type": "dropout", "rate": 1}),
            r"layer 0 \(dropout\) .*rate must be a number in \[0, 1\), got 1",
        ),
        (with_layer({"type": "dropout", "rate": float("nan")}), r"layer 0 \(dropout\) .*got nan"),
        (with_layer({"type": "dropout"}), r"layer 0 \(dropout\): missing required options \['rate'\]"),
        (
            with_layer({"type": "batchnorm", "momentum": 0.0}),
            r"layer 0 \(batchnorm\) .*momentum must be .* \(0, 1\]",
        ),
        (with_layer({"type": "batchnorm", "momentum": 1.01}), r"layer 0 \(batchnorm\) .*momentum must be"),
        (
            with_layer({"type": "batchnorm", "eps": -1e-5}),
            r"layer 0 \(batchnorm\) .*eps must be a finite number above 0",
        ),
        (with_layer({"type": "batchnorm", "eps": float("nan")}), r"layer 0 \(batchnorm\) .*eps must be"),
        (
            with_layer({"type": "batchnorm", "affine": False}),
            r"layer 0 \(batchnorm\): unknown options \['affine'\]",
        ),
        (
            {"input_shape": [8], "layers": [{"type": "global_avgpool"}, {"type": "dense", "units": 2}]},
            r"layer 0 \(global_avgpool\) with input shape \(8,\): .*have none",
        ),
        (
            with_layer({"type": "leaky_relu", "negative_slope": "0.1"}),
            r"layer 0 \(leaky_relu\) .*negative_slope",
        ),
        (with_layer({"type": "gelu", "approximate": True}), r"layer 0 \(gelu\) .*approximate must be one of"),
    ],
)
def test_a_new_layer_option_that_cannot_work_is_refused_naming_the_layer_and_the_rule(spec, expected):
    with pytest.raises(SpecError, match=expected):
        build_model(spec)
