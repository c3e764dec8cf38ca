"""Pooling refuses padding above half its window (PyTorch's rule): no window of padding alone."""

import itertools
import warnings

import numpy as np
import pytest

from shared.nn import SpecError, build_model
from shared.nn.layers import AvgPool2D, MaxPool2D

RULE = "padding must be at most half the window (size // 2) in each dimension, as PyTorch requires"


def pool_spec(kind: str, hw: int, **options) -> dict:
    return {
        "input_shape": [1, hw, hw],
        "layers": [{"type": kind, **options}, {"type": "flatten"}, {"type": "dense", "units": 2}],
    }


@pytest.mark.parametrize("kind", ["maxpool2d", "avgpool2d"])
@pytest.mark.parametrize(
    "hw, options",
    [
        (3, dict(size=2, padding=2)),  # the examples: windows of padding only
        (4, dict(size=3, padding=3)),
        (5, dict(size=3, padding=2)),  # no all-padding window, but above half: PyTorch refuses it too
        (6, dict(size=[2, 4], padding=[1, 3])),  # the width breaks the rule, the height keeps it
    ],
)
def test_a_spec_with_pool_padding_above_half_the_window_is_refused_naming_the_layer(kind, hw, options):
    spec = pool_spec(kind, hw, **options)
    spec["layers"].insert(0, {"type": "relu"})
    with pytest.raises(SpecError) as refused:
        build_model(spec)
    assert str(refused.value).startswith(f"layer 1 ({kind}) with input shape (1, {hw}, {hw}): padding ")
    assert RULE in str(refused.value)


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
def test_padding_of_half_the_window_is_accepted_and_gives_finite_outputs(cls):
    for size, hw in itertools.product(range(1, 6), range(1, 7)):
        if size > hw + 2 * (size // 2):
            continue  # the window does not fit the padded input: refused for that reason
        layer = cls((1, hw, hw), size=size, stride=1, padding=size // 2)
        x = np.random.default_rng(size).standard_normal((2, 1, hw, hw))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # avg's 0/0 would warn
            assert np.isfinite(layer.forward(x)).all(), (size, hw)


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
def test_same_padding_never_breaks_the_rule_nor_gives_a_window_of_padding_only(cls):
    """Every size, stride and input up to 7 (both axes at once, and uneven ones)."""
    for size, stride, h, w in itertools.product(range(1, 6), range(1, 6), range(1, 8), range(1, 8)):
        layer = cls((1, h, w), size=size, stride=stride, padding="same")  # would raise SpecError
        window = layer.window
        assert max(window.pad_top, window.pad_bottom) <= size // 2
        assert max(window.pad_left, window.pad_right) <= size // 2
        x = np.random.default_rng(0).standard_normal((1, 1, h, w))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.isfinite(layer.forward(x)).all(), (size, stride, h, w)
