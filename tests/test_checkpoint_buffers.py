"""Checkpoints of models with buffers (BatchNorm's running statistics): saved by name beside the
parameters, verified like them, and refused when missing, extra, misshapen or not finite."""

import numpy as np
import pytest
import safetensors.numpy

from shared.checkpoints import checkpoint
from shared.checkpoints.checkpoint import CheckpointError, CheckpointMeta
from shared.nn import build_model
from tests.test_checkpoint_format import FORMAT_1_FIXTURE, rewrite
from tests.test_spec import EVERY_NEW_LAYER

BUFFERS = ["layers.1.running_mean", "layers.1.running_var", "layers.5.running_mean", "layers.5.running_var"]


def model_with_buffers():
    model = build_model(EVERY_NEW_LAYER).initialise(2)
    rng = np.random.default_rng(3)
    for array in model.buffers().values():  # as if trained: not the 0 and 1 they start at
        array[:] = rng.uniform(0.5, 2.0, array.shape)
    return model


def encoded(model):
    return checkpoint.encode(model, CheckpointMeta(model_name="bn", spec={}, dtype=""))


def forged(blob, tensors):
    """`blob` with `tensors` instead of its own, under a checksum that matches them."""
    return rewrite(
        blob, weights=tensors, meta_change=lambda f: f.update(xxh3_128=checkpoint.weights_xxh3_128(tensors))
    )


def test_buffers_are_saved_by_name_and_restored_exactly():
    model = model_with_buffers()
    blob = encoded(model)
    assert set(BUFFERS) <= safetensors.numpy.load(blob).keys()
    restored = checkpoint.decode(blob).model
    assert restored.buffers().keys() == set(BUFFERS)
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[name], array)
    x = np.random.default_rng(4).standard_normal((5, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(restored.predict_proba(x), model.predict_proba(x))


def test_a_checkpoint_of_a_model_without_buffers_reads_as_before():
    restored = checkpoint.load(FORMAT_1_FIXTURE).model
    assert restored.buffers() == {} and restored.buffer_shapes() == {}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("layers.5.running_var"), r"missing \['layers.5.running_var'\]"),
        (
            lambda t: t.update({"layers.2.running_mean": np.zeros(3, np.float32)}),
            r"unexpected \['layers.2.running_mean'\]",
        ),
        (
            lambda t: t.update({"layers.1.running_mean": np.zeros(4, np.float32)}),
            r"layers.1.running_mean has shape \(4,\), the spec needs \(3,\)",
        ),
        (
            lambda t: t["layers.1.running_var"].__setitem__(0, np.nan),
            r"non-finite weights .* layers.1.running_var",
        ),
        (
            lambda t: t["layers.5.running_mean"].__setitem__(2, np.inf),
            r"non-finite weights .* layers.5.running_mean",
        ),
    ],
    ids=["missing", "extra", "wrong shape", "NaN", "infinite"],
)
def test_a_checkpoint_whose_buffers_do_not_fit_is_refused(change, message):
    blob = encoded(model_with_buffers())
    tensors = {name: np.array(array) for name, array in safetensors.numpy.load(blob).items()}
    change(tensors)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.decode(forged(blob, tensors))


def test_non_finite_buffers_are_not_written():
    model = model_with_buffers()
    model.buffers()["layers.1.running_var"][1] = np.inf
    with pytest.raises(CheckpointError, match=r"non-finite weights .* layers\.1\.running_var"):
        encoded(model)
