"""The checkpoint format: round trips, and refusal of anything that does not verify."""

import json

import numpy as np
import pytest
import safetensors.numpy

from shared.checkpoints import checkpoint
from shared.checkpoints.checkpoint import CheckpointError, CheckpointMeta
from shared.nn import build_model
from tests.test_spec import SMALL_CNN


def make_blob(dtype=np.float32):
    model = build_model(SMALL_CNN, dtype=dtype).initialise(3)
    meta = CheckpointMeta(
        model_name="digits_cnn",
        spec={},
        dtype="",
        version=4,
        step=120,
        epoch=2,
        metrics={"test_accuracy": 0.97},
        dataset="digits",
        hyperparameters={"learning_rate": 0.001},
    )
    return model, checkpoint.encode(model, meta)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_of_every_layer_type(dtype):
    model, blob = make_blob(dtype)
    restored = checkpoint.decode(blob)
    assert {layer["type"] for layer in restored.meta.spec["layers"]} == {
        "conv2d",
        "tanh",
        "avgpool2d",
        "relu",
        "maxpool2d",
        "flatten",
        "dense",
        "sigmoid",
    }
    assert (
        restored.meta.version == 4
        and restored.meta.epoch == 2
        and restored.meta.dtype == np.dtype(dtype).name
    )
    assert restored.meta.created_at.endswith("+00:00") and len(restored.meta.sha256) == 64
    for name, weights in model.state_dict().items():
        assert restored.model.state_dict()[name].dtype == dtype
        np.testing.assert_array_equal(restored.model.state_dict()[name], weights)
    x = np.random.default_rng(0).standard_normal((3, *model.input_shape))
    np.testing.assert_array_equal(restored.model.predict_proba(x), model.predict_proba(x))


def test_file_save_and_load(tmp_path):
    model, _ = make_blob()
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, CheckpointMeta(model_name="m", spec={}, dtype=""))
    assert checkpoint.load(path).meta.model_name == "m"


def rewrite(blob, *, weights=None, meta_change=None):
    """A blob re-serialised with changed weights and/or metadata (a tamperer's work)."""
    header = checkpoint.read_meta(blob)
    fields = {"format": 1, **header.__dict__}
    if meta_change:
        meta_change(fields)
    tensors = weights if weights is not None else safetensors.numpy.load(blob)
    return safetensors.numpy.save(tensors, metadata={"tandem": json.dumps(fields)})


def test_flipped_weight_byte_fails_the_checksum():
    _, blob = make_blob()
    corrupted = bytearray(blob)
    corrupted[-3] ^= 0x40
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.decode(bytes(corrupted))


def test_weights_swapped_under_an_old_header_fail_the_checksum():
    _, blob = make_blob()
    other = {k: v + 1 for k, v in safetensors.numpy.load(blob).items()}
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.decode(rewrite(blob, weights=other))


def test_spec_that_disagrees_with_the_weights_is_refused():
    _, blob = make_blob()

    def widen(fields):
        fields["spec"]["layers"][-1]["units"] = 4

    with pytest.raises(CheckpointError, match=r"architecture mismatch: .*layers\.9\.W has shape"):
        checkpoint.decode(rewrite(blob, meta_change=widen))


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "truncated"),
        (b"\xff" * 8 + b"{}", "truncated: header says"),
        (safetensors.numpy.save({"a": np.zeros(2)}), "not a Tandem checkpoint"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "not a Tandem checkpoint"),
        (safetensors.numpy.save({"a": np.zeros(2)}, metadata={"tandem": "[1]"}), "not a JSON object"),
    ],
)
def test_garbage_is_refused(blob, message):
    with pytest.raises(CheckpointError, match=message):
        checkpoint.decode(blob)


def test_truncated_weights_are_refused():
    _, blob = make_blob()
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        checkpoint.decode(blob[:-100])


@pytest.mark.parametrize("name", ["", "../etc", "a b", "x" * 65, "-lead", "name:1"])
def test_unsafe_model_names_are_refused(name):
    model, _ = make_blob()
    with pytest.raises(ValueError, match="model_name must be"):
        checkpoint.encode(model, CheckpointMeta(model_name=name, spec={}, dtype=""))
