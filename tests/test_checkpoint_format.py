"""The checkpoint format: round trips, safetensors' layout, format 1 still read, no copies,
and refusal of anything that does not verify."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from shared.checkpoints import checkpoint
from shared.checkpoints.checkpoint import CheckpointError, CheckpointMeta
from shared.nn import build_model
from tests.test_spec import SMALL_CNN

# A format-1 checkpoint (SHA-256), written by main's encoder at commit 229da06 (the last build
# that wrote format 1), from `git archive 229da06 shared`:
#   model = build_model({"input_shape": [4], "layers": [{"type": "dense", "units": 3},
#                        {"type": "relu"}, {"type": "dense", "units": 2}]}).initialise(7)
#   checkpoint.save(path, model, CheckpointMeta("format-one", model.spec, "float32", version=3,
#       step=40, epoch=2, metrics={"test_accuracy": 0.75}, dataset="digits",
#       created_at="2025-01-01T00:00:00.000+00:00"))
FORMAT_1_FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-format1.safetensors"


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
    assert restored.meta.created_at.endswith("+00:00")
    assert len(restored.meta.xxh3_128) == 32 and restored.meta.sha256 == ""  # format 2
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


def test_the_blob_is_safetensors_own_layout_byte_for_byte(tmp_path):
    model, blob = make_blob()
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    with safetensors.safe_open(path, "numpy") as f:  # safetensors' own reader, as other tools use it
        tandem = json.loads(f.metadata()["tandem"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (no __iter__)
    assert tandem["format"] == 2 and tandem["xxh3_128"] == checkpoint.read_meta(blob).xxh3_128
    assert tensors.keys() == model.state_dict().keys()
    for name, weights in model.state_dict().items():
        np.testing.assert_array_equal(tensors[name], weights)
    assert safetensors.numpy.save(model.state_dict(), metadata=header_metadata(blob)) == blob


def header_metadata(blob) -> dict:
    """The blob's "__metadata__", read straight from its JSON header."""
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length])["__metadata__"]


def test_encoding_and_decoding_copy_no_tensor():
    model, _ = make_blob()
    encoded = checkpoint.encode_parts(model, CheckpointMeta(model_name="m", spec={}, dtype=""))
    assert encoded.size == len(b"".join(encoded.parts))
    live = {**model.parameters(), **model.buffers()}
    for part, weights in zip(encoded.parts[1:], dict(sorted(live.items())).values(), strict=True):
        assert np.shares_memory(np.frombuffer(part, np.uint8), weights)  # a view, sent as it is
    blob = b"".join(encoded.parts)
    data = np.frombuffer(blob, np.uint8)
    restored = checkpoint.decode(blob)
    for weights in restored.model.parameters().values():
        assert np.shares_memory(weights, data) and not weights.flags.writeable
    # A model to train on takes copies (as a resumed training does): writable, and its own.
    trainable = build_model(restored.meta.spec).load_state_dict(restored.model.state_dict())
    assert all(w.flags.writeable and not np.shares_memory(w, data) for w in trainable.parameters().values())


def test_a_format_1_checkpoint_is_still_read_and_verified():
    blob = FORMAT_1_FIXTURE.read_bytes()
    restored = checkpoint.decode(blob)
    assert (restored.meta.model_name, restored.meta.version, restored.meta.step) == ("format-one", 3, 40)
    assert restored.meta.sha256 == "97261f2314c9e8c281d877dd8f8b49b208659a28e73c6573ba31e3154a1731ed"
    assert restored.model.state_dict()["layers.0.W"][0, 1] == np.float32(0.21124500036239624)
    assert restored.model.predict_proba(np.ones((1, 4))).shape == (1, 2)
    corrupted = bytearray(blob)
    corrupted[-3] ^= 0x40
    with pytest.raises(CheckpointError, match="checksum mismatch: the header says sha256 97261f2314c9e8c2"):
        checkpoint.decode(bytes(corrupted))


@pytest.mark.parametrize("claimed", [3, 0, "2", True, 2.0, None, [2]])
def test_unknown_formats_are_refused_naming_the_ones_this_build_reads(claimed):
    _, blob = make_blob()
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint format .*reads formats 1, 2$"):
        checkpoint.decode(rewrite(blob, meta_change=lambda fields: fields.update(format=claimed)))


def rewrite(blob, *, weights=None, meta_change=None):
    """A blob re-serialised with changed weights and/or metadata (a tamperer's work)."""
    header = checkpoint.read_meta(blob)
    fields = {"format": 2, **header.__dict__}
    if meta_change:
        meta_change(fields)
    tensors = weights if weights is not None else safetensors.numpy.load(blob)
    return safetensors.numpy.save(tensors, metadata={"tandem": json.dumps(fields)})


def relayout(blob, change):
    """A blob whose safetensors header `change(entries, data)` edited (a tamperer's or a bug's work)."""
    (length,) = struct.unpack("<Q", blob[:8])
    entries, data = json.loads(blob[8 : 8 + length]), bytearray(blob[8 + length :])
    change(entries, data)
    text = json.dumps(entries).encode()
    return struct.pack("<Q", len(text)) + text + bytes(data)


def set_entry(name, **fields):
    return lambda entries, _data: entries[name].update(fields)


def tensor_size(blob, name):
    begin, end = json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])[name]["data_offsets"]
    return end - begin


@pytest.mark.parametrize(
    "change, message",
    [
        (set_entry("layers.0.W", dtype="BF16"), r"layers\.0\.W' has dtype 'BF16'; .* hold F32 or F64"),
        (set_entry("layers.0.W", dtype="I32"), r"has dtype 'I32'"),
        (set_entry("layers.0.W", shape=[1, 2]), r"layers\.0\.W' of shape \[1, 2\] .* takes 8 bytes"),
        (set_entry("layers.0.W", shape=[-1, 3]), r"has shape \[-1, 3\]"),
        (set_entry("layers.0.W", shape="3"), r"has shape '3'"),
        (set_entry("layers.0.W", data_offsets=[0]), r"has data_offsets \[0\], not \[begin, end\]"),
        (set_entry("layers.0.W", data_offsets=[8, 4]), r"not \[begin, end\]|takes"),
        (set_entry("layers.0.W", data_offsets=[True, 2]), r"not \[begin, end\]"),
        (
            lambda entries, _data: entries["layers.0.W"].pop("shape"),
            "needs exactly dtype, shape and data_offsets",
        ),
        (lambda entries, _data: entries["layers.0.W"].update(extra=1), "needs exactly dtype"),
        (lambda entries, _data: entries.update({"layers.0.W": [1]}), "needs exactly dtype"),
        (lambda _entries, data: data.extend(b"\0" * 8), r"the tensors cover \d+ bytes of data, \d+ follow"),
        (lambda _entries, data: data.__delitem__(slice(-4, None)), r"the tensors cover \d+ bytes .* follow"),
        (lambda entries, _data: shift(entries, "layers.0.b", -4), "a gap or an overlap"),
        (lambda entries, _data: shift(entries, "layers.0.b", +4), "a gap or an overlap"),
    ],
)
def test_a_layout_that_is_not_safetensors_own_is_refused(change, message):
    _, blob = make_blob()
    with pytest.raises(CheckpointError, match=message):
        checkpoint.decode(relayout(blob, change))


def shift(entries, name, by):
    """Move one tensor's offsets by `by` bytes: into its neighbour (overlap) or away (gap)."""
    begin, end = entries[name]["data_offsets"]
    entries[name]["data_offsets"] = [begin + by, end + by]


def test_a_header_length_over_the_limit_is_refused_before_it_is_read():
    claim = struct.pack("<Q", checkpoint.MAX_HEADER_BYTES + 1)
    with pytest.raises(CheckpointError, match=r"its header claims 16,777,217 bytes, over the limit"):
        checkpoint.decode(claim + b"{}")
    with pytest.raises(CheckpointError, match="over the limit"):
        checkpoint.read_meta(struct.pack("<Q", 2**63) + b"{}")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_with_a_matching_checksum_are_refused(bad):
    _, blob = make_blob()
    weights = {name: np.array(array) for name, array in safetensors.numpy.load(blob).items()}
    weights["layers.9.W"][0, 1] = bad
    forged = rewrite(
        blob, weights=weights, meta_change=lambda f: f.update(xxh3_128=checkpoint.weights_xxh3_128(weights))
    )
    with pytest.raises(CheckpointError, match=r"non-finite weights \(NaN or infinity\) in layers\.9\.W"):
        checkpoint.decode(forged)


def test_huge_but_finite_weights_are_not_mistaken_for_infinite():
    model, _ = make_blob()
    model.parameters()["layers.9.W"][:] = 3e38  # its dot product overflows float32: checked element-wise
    blob = checkpoint.encode(model, CheckpointMeta(model_name="m", spec={}, dtype=""))
    assert checkpoint.decode(blob).model.state_dict()["layers.9.W"].max() == np.float32(3e38)


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
        (b"\x10" + b"\0" * 7 + b"{}", "truncated: header says 16 bytes, 2 follow"),
        (b"\x02\0\0\0\0\0\0\0[]", "not a Tandem checkpoint: unreadable header"),
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
    with pytest.raises(CheckpointError, match="corrupt checkpoint: the tensors cover"):
        checkpoint.decode(blob[:-100])


def test_a_dtype_that_is_no_model_dtype_is_refused():
    _, blob = make_blob()
    with pytest.raises(
        CheckpointError, match=r"architecture mismatch: dtype 'int32' is not float32 or float64"
    ):
        checkpoint.decode(rewrite(blob, meta_change=lambda fields: fields.update(dtype="int32")))


@pytest.mark.parametrize("name", ["", "../etc", "a b", "x" * 65, "-lead", "name:1"])
def test_unsafe_model_names_are_refused(name):
    model, _ = make_blob()
    with pytest.raises(ValueError, match="model_name must be"):
        checkpoint.encode(model, CheckpointMeta(model_name=name, spec={}, dtype=""))
