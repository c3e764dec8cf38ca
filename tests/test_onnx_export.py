"""Tests for ONNX export (shared.export.onnx) and `tandem export` (shared.cli.export).

Every exported model runs in the real onnxruntime (CPUExecutionProvider) on
batches of 1, 7 and 64 rows, and must answer as the NumPy model does:
probabilities within 1e-5 of Model.predict_proba, the same classes wherever
the two most probable classes are more than 1e-6 apart.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from shared.checkpoints.checkpoint import CheckpointMeta, load, save
from shared.cli.errors import run_command
from shared.cli.export import add_export
from shared.export.onnx import (
    DEFAULT_OPSET,
    EXPORTERS,
    MIN_OPSET,
    ExportError,
    newest_opset,
    save_onnx,
    to_onnx,
)
from shared.nn import LAYER_TYPES, Model, SpecError, build_model, spec_to_json
from shared.nn.layers import Layer
from shared.nn.presets import PRESETS

BATCH_SIZES = (1, 7, 64)
PROBABILITY_TOLERANCE = 1e-5  # float32, absolute
TIE = 1e-6  # top-2 probabilities this close may be ordered either way
ACTIVATIONS = ("relu", "sigmoid", "tanh")
TINY_MLP = {
    "input_shape": [1, 4, 4],
    "layers": [
        {"type": "flatten"},
        {"type": "dense", "units": 8},
        {"type": "relu"},
        {"type": "dense", "units": 3},
    ],
}


def image_spec(input_shape, *layers, classes=3) -> dict:
    return {
        "input_shape": list(input_shape),
        "layers": [*layers, {"type": "flatten"}, {"type": "dense", "units": classes}],
    }


def seeded_model(spec: dict, seed: int = 0, dtype=np.float32) -> Model:
    """The spec's model with seeded weights and seeded, non-zero biases (so that the biases count)."""
    model = build_model(spec, dtype=dtype).initialise(seed)
    rng = np.random.default_rng(seed + 1)
    for layer in model.layers:
        if "b" in layer.params:
            layer.params["b"] = rng.normal(0, 0.5, layer.params["b"].shape).astype(dtype)
    return model


def session(proto: onnx.ModelProto) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_answers_like(model: Model, proto: onnx.ModelProto, seed: int = 0) -> None:
    """onnxruntime's answers from `proto` on batches of 1, 7 and 64 rows are the model's own."""
    runner = session(proto)
    rng = np.random.default_rng(seed)
    for rows in BATCH_SIZES:
        x = rng.normal(size=(rows, *model.input_shape)).astype(model.dtype)
        probabilities, classes = runner.run(["probabilities", "classes"], {"input": x})
        expected = model.predict_proba(x)
        assert probabilities.dtype == np.float32 and probabilities.shape == (rows, model.num_classes)
        assert classes.dtype == np.int64 and classes.shape == (rows,)
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=PROBABILITY_TOLERANCE)
        top_two = np.sort(expected, axis=1)[:, -2:]
        clear = top_two[:, 1] - top_two[:, 0] > TIE
        np.testing.assert_array_equal(classes[clear], expected.argmax(axis=1)[clear])


def assert_exports(spec: dict, seed: int = 0) -> None:
    model = seeded_model(spec, seed)
    assert_answers_like(model, to_onnx(model), seed)


# ---------------------------------------------------------------- layers and padding modes


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
def test_conv2d_same_padding_odd_and_even_kernels_and_strides(kernel, stride):
    """Even kernels and strides above 1 pad unevenly: the extra row and column go bottom and right."""
    conv = {"type": "conv2d", "filters": 4, "kernel_size": kernel, "stride": stride, "padding": "same"}
    assert_exports(image_spec([2, 7, 10], conv), seed=kernel * 10 + stride)


@pytest.mark.parametrize(
    "options",
    [
        {"kernel_size": 3, "padding": "valid"},
        {"kernel_size": 3, "stride": 2, "padding": "valid"},
        {"kernel_size": [2, 4], "stride": [1, 3], "padding": "valid"},
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": 2},
        {"kernel_size": [3, 2], "padding": [2, 1]},
        {"kernel_size": 2, "stride": 3, "padding": [0, 1]},
        {"kernel_size": 1, "padding": 2},  # windows of padding alone: the bias is their answer
        {"kernel_size": [1, 5], "stride": [2, 1], "padding": "same"},
    ],
    ids=lambda options: json.dumps(options, separators=(",", ":")),
)
def test_conv2d_valid_and_integer_padding(options):
    assert_exports(image_spec([3, 9, 6], {"type": "conv2d", "filters": 5, **options}))


@pytest.mark.parametrize("kind", ["maxpool2d", "avgpool2d"])
@pytest.mark.parametrize(
    "options",
    [
        {"size": 2},
        {"size": 3},
        {"size": 2, "stride": 1},
        {"size": 3, "stride": 2},
        {"size": 2, "stride": 3},
        {"size": 3, "padding": "same"},
        {"size": 2, "stride": 2, "padding": "same"},
        {"size": 3, "stride": 1, "padding": 1},
        {"size": [3, 2], "stride": [2, 1], "padding": [2, 1]},
        {"size": 2, "padding": 1},
    ],
    ids=lambda options: json.dumps(options, separators=(",", ":")),
)
def test_pooling_with_and_without_padding_and_stride(kind, options):
    """Padding never wins a maximum and never counts in an average, in both."""
    conv = {"type": "conv2d", "filters": 3, "kernel_size": 3, "padding": "same"}  # pools negative values too
    assert_exports(image_spec([2, 7, 9], conv, {"type": kind, **options}))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_only_mlps_with_each_activation(activation):
    spec = {
        "input_shape": [13],
        "layers": [
            {"type": "dense", "units": 11},
            {"type": activation},
            {"type": "dense", "units": 7},
            {"type": activation},
            {"type": "dense", "units": 4},
        ],
    }
    assert_exports(spec)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_on_images(activation):
    conv = {"type": "conv2d", "filters": 3, "kernel_size": 2}
    assert_exports(image_spec([1, 5, 6], conv, {"type": activation}, {"type": "maxpool2d", "size": 2}))


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28)])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset(preset, input_shape):
    assert_exports(PRESETS[preset].spec(input_shape, 10))


# ---------------------------------------------------------------- a seeded random set of specs


def _axis_pair(rng: np.random.Generator, low: int, high: int) -> int | list[int]:
    """An int in [low, high), or a (height, width) pair of them."""
    if rng.random() < 0.7:
        return int(rng.integers(low, high))
    return [int(rng.integers(low, high)), int(rng.integers(low, high))]


def _random_window_layer(rng: np.random.Generator) -> dict:
    kind = str(rng.choice(["conv2d", "maxpool2d", "avgpool2d"]))
    size = _axis_pair(rng, 1, 5)
    stride = _axis_pair(rng, 1, 4)
    mode = rng.choice(["same", "valid", "int"])
    if mode != "int":
        padding: str | list[int] = str(mode)
    elif kind == "conv2d":
        padding = [int(rng.integers(0, 4)), int(rng.integers(0, 4))]
    else:  # ONNX Runtime pools only with padding smaller than the window (see the refusal below)
        kh, kw = (size, size) if isinstance(size, int) else size
        padding = [int(rng.integers(0, kh)), int(rng.integers(0, kw))]
    if kind == "conv2d":
        options = {"filters": int(rng.integers(1, 7)), "kernel_size": size}
    else:
        options = {"size": size}
    return {"type": kind, **options, "stride": stride, "padding": padding}


def _random_spec(rng: np.random.Generator) -> dict:
    """An MLP on flat samples (a quarter of them) or window layers on images, then dense layers."""
    layers: list[dict] = []
    if rng.random() < 0.25:
        input_shape = [int(rng.integers(2, 30))]
    else:
        input_shape = [int(rng.integers(1, 4)), int(rng.integers(3, 13)), int(rng.integers(3, 13))]
        for _ in range(int(rng.integers(1, 4))):
            layers.append(_random_window_layer(rng))
            if rng.random() < 0.6:
                layers.append({"type": str(rng.choice(ACTIVATIONS))})
        layers.append({"type": "flatten"})
    for _ in range(int(rng.integers(0, 3))):
        layers += [
            {"type": "dense", "units": int(rng.integers(2, 20))},
            {"type": str(rng.choice(ACTIVATIONS))},
        ]
    layers.append({"type": "dense", "units": int(rng.integers(2, 11))})
    return {"input_shape": input_shape, "layers": layers}


def random_specs(count: int, seed: int) -> list[dict]:
    """`count` specs that build_model accepts, drawn from a seeded generator (refused ones skipped)."""
    rng = np.random.default_rng(seed)
    specs: list[dict] = []
    while len(specs) < count:
        spec = _random_spec(rng)
        try:
            build_model(spec)
        except SpecError:
            continue
        specs.append(spec)
    return specs


RANDOM_SPECS = random_specs(40, seed=20261202)


@pytest.mark.parametrize("index", range(len(RANDOM_SPECS)))
def test_random_specs(index):
    assert_exports(RANDOM_SPECS[index], seed=index)


def test_the_random_specs_cover_every_layer_type_and_padding_mode():
    layers = [layer for spec in RANDOM_SPECS for layer in spec["layers"]]
    assert {layer["type"] for layer in layers} == set(LAYER_TYPES)
    for kind in ("conv2d", "maxpool2d", "avgpool2d"):
        paddings = {str(layer["padding"]) for layer in layers if layer["type"] == kind}
        assert {"same", "valid"} < paddings, kind  # and at least one integer padding


# ---------------------------------------------------------------- what is refused


def test_every_layer_type_has_an_exporter():
    assert set(LAYER_TYPES) - set(EXPORTERS) == set()


def test_a_layer_type_without_an_exporter_is_refused_by_name():
    class Shuffle(Layer):
        type_name = "shuffle"

    model = seeded_model(TINY_MLP)
    model.layers.insert(1, Shuffle(model.layers[1].input_shape))
    with pytest.raises(ExportError, match=r"layer 1 \(shuffle\): no ONNX exporter for this layer type"):
        to_onnx(model)


@pytest.mark.parametrize("kind", ["maxpool2d", "avgpool2d"])
def test_pooling_with_padding_as_large_as_its_window_is_refused(kind):
    """Some of its windows would hold padding alone (Tandem answers -inf or 0/0 there),
    and ONNX Runtime refuses such pools."""
    model = seeded_model(image_spec([1, 6, 6], {"type": kind, "size": 2, "padding": 2}))
    with pytest.raises(
        ExportError, match=rf"layer 0 \({kind}\): padding .* is not smaller than the 2x2 window"
    ):
        to_onnx(model)


def test_float64_models_run_in_float64():
    spec = image_spec([1, 6, 5], {"type": "maxpool2d", "size": 2, "padding": "same"}, {"type": "sigmoid"})
    spec["layers"][3:3] = [{"type": "dense", "units": 6}, {"type": "tanh"}, {"type": "relu"}]
    model = seeded_model(spec, dtype=np.float64)
    proto = to_onnx(model)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.DOUBLE}
    assert_answers_like(model, proto)


@pytest.mark.parametrize("layer", [{"type": "conv2d", "filters": 2}, {"type": "avgpool2d"}])
def test_float64_layers_onnxruntime_cannot_run_in_float64_are_refused(layer):
    model = seeded_model(image_spec([1, 6, 6], layer), dtype=np.float64)
    with pytest.raises(ExportError, match=rf"layer 0 \({layer['type']}\): .* float32 only"):
        to_onnx(model)


# ---------------------------------------------------------------- versions and metadata


def test_the_default_opset_and_the_oldest_ir_version_it_allows():
    proto = to_onnx(seeded_model(TINY_MLP))
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", DEFAULT_OPSET)] == [("", 17)]
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(list(proto.opset_import)) == 8
    onnx.checker.check_model(proto, full_check=True)


def test_the_newest_opset_is_one_onnx_and_onnxruntime_both_know():
    assert DEFAULT_OPSET <= newest_opset() <= onnx.defs.onnx_opset_version()


@pytest.mark.parametrize("opset", [MIN_OPSET, DEFAULT_OPSET, newest_opset()])
def test_every_supported_opset_from_the_oldest_to_the_newest_runs(opset):
    model = seeded_model(image_spec([1, 5, 5], {"type": "conv2d", "filters": 2}, {"type": "avgpool2d"}))
    proto = to_onnx(model, opset=opset)
    assert proto.opset_import[0].version == opset
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(list(proto.opset_import))
    assert_answers_like(model, proto)


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, newest_opset() + 1, 0, "17", 17.0, True])
def test_an_unsupported_opset_is_refused(opset):
    with pytest.raises(ExportError, match=rf"opset must be an int from {MIN_OPSET} to {newest_opset()}"):
        to_onnx(seeded_model(TINY_MLP), opset=opset)


def test_the_file_carries_the_spec_and_dtype():
    model = seeded_model(TINY_MLP)
    proto = to_onnx(model, name="tiny", metadata={"note": "hello"})
    props = {p.key: p.value for p in proto.metadata_props}
    assert props == {"tandem.spec": spec_to_json(model.spec), "tandem.dtype": "float32", "note": "hello"}
    assert (proto.graph.name, proto.producer_name) == ("tiny", "tandem")
    assert proto.producer_version


def test_a_saved_checkpoint_exports_the_same_model_with_its_metadata(tmp_path):
    model = seeded_model(PRESETS["digits-cnn"].spec((1, 8, 8), 10), seed=3)
    save(tmp_path / "digits.safetensors", model, CheckpointMeta("digits", model.spec, "float32", version=7))
    checkpoint = load(tmp_path / "digits.safetensors")

    proto = save_onnx(checkpoint, tmp_path / "digits.onnx")
    from_file = onnx.load(tmp_path / "digits.onnx")
    assert from_file == proto
    onnx.checker.check_model(from_file, full_check=True)
    assert {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in from_file.graph.initializer} == {
        t.name: onnx.numpy_helper.to_array(t).tobytes() for t in to_onnx(model).graph.initializer
    }
    assert_answers_like(model, from_file)

    meta = session(from_file).get_modelmeta()
    assert (meta.graph_name, meta.producer_name) == ("digits", "tandem")
    assert meta.custom_metadata_map == {
        "tandem.model_name": "digits",
        "tandem.version": "7",
        "tandem.xxh3_128": checkpoint.meta.xxh3_128,
        "tandem.spec": spec_to_json(model.spec),
        "tandem.dtype": "float32",
    }


def test_without_onnx_the_import_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets when it is not installed
    monkeypatch.delitem(sys.modules, "shared.export.onnx")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[onnx\]' from the checkout"):
        importlib.import_module("shared.export.onnx")


# ---------------------------------------------------------------- `tandem export`


def tandem(capsys, *argv) -> tuple[int, str, str]:
    """Run `tandem export ...` through a parser of its own (and the CLI's error handling)."""
    parser = argparse.ArgumentParser(prog="tandem")
    add_export(parser.add_subparsers(required=True))
    code = run_command(parser.parse_args([str(arg) for arg in argv]))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def digits(tmp_path) -> tuple[Path, Model]:
    """A digits-cnn checkpoint in its own directory, and its model."""
    model = seeded_model(PRESETS["digits-cnn"].spec((1, 8, 8), 10), seed=5)
    path = tmp_path / "digits.safetensors"
    save(path, model, CheckpointMeta("digits", model.spec, "float32", version=2))
    return path, model


def test_export_writes_the_file_and_says_what_it_wrote(capsys, digits):
    checkpoint, model = digits
    out = checkpoint.with_name("digits.onnx")
    code, stdout, stderr = tandem(capsys, "export", checkpoint, "--onnx", out)
    assert (code, stderr) == (0, "")
    assert stdout.splitlines() == [
        f"wrote {out} ({out.stat().st_size:,} bytes, opset 17, IR 8)",
        "  input   input          float32  [batch, 1, 8, 8]",
        "  output  probabilities  float32  [batch, 10]",
        "  output  classes        int64    [batch]",
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits.onnx", "digits.safetensors"]
    assert_answers_like(model, onnx.load(out))


def test_export_takes_an_opset(capsys, digits):
    checkpoint, _ = digits
    out = checkpoint.with_name("digits.onnx")
    code, stdout, _ = tandem(capsys, "export", checkpoint, "--onnx", out, "--opset", MIN_OPSET)
    assert code == 0 and f"opset {MIN_OPSET}, IR 7)" in stdout
    assert onnx.load(out).opset_import[0].version == MIN_OPSET


def test_export_refuses_to_overwrite_without_force(capsys, digits):
    checkpoint, model = digits
    out = checkpoint.with_name("digits.onnx")
    out.write_bytes(b"keep me")
    code, stdout, stderr = tandem(capsys, "export", checkpoint, "--onnx", out)
    assert (code, stdout) == (2, "")
    assert stderr == f"tandem: error: {out}: exists already (--force replaces it)\n"
    assert out.read_bytes() == b"keep me"

    assert tandem(capsys, "export", checkpoint, "--onnx", out, "--force")[0] == 0
    assert_answers_like(model, onnx.load(out))


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"just some text, not a checkpoint\n", "not a Tandem checkpoint"),
        (np.random.default_rng(0).bytes(4096), "not a Tandem checkpoint"),
        (b"", "checkpoint is truncated: 0 bytes"),
    ],
    ids=["text", "random-bytes", "empty"],
)
def test_a_file_that_is_not_a_checkpoint_is_an_error(capsys, tmp_path, content, error):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(content)
    code, stdout, stderr = tandem(capsys, "export", bogus, "--onnx", tmp_path / "bogus.onnx")
    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"tandem: error: {bogus}: {error}") and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.safetensors"]


def test_a_missing_checkpoint_is_an_error(capsys, tmp_path):
    missing = tmp_path / "missing.safetensors"
    code, _, stderr = tandem(capsys, "export", missing, "--onnx", tmp_path / "x.onnx")
    assert (code, stderr) == (2, f"tandem: error: {missing}: No such file or directory\n")


def test_a_missing_output_directory_is_an_error(capsys, digits):
    checkpoint, _ = digits
    directory = checkpoint.parent / "no" / "such"
    code, _, stderr = tandem(capsys, "export", checkpoint, "--onnx", directory / "digits.onnx")
    assert (code, stderr) == (2, f"tandem: error: {directory}: no such directory\n")


def test_an_output_that_is_a_directory_is_an_error(capsys, digits):
    checkpoint, _ = digits
    code, _, stderr = tandem(capsys, "export", checkpoint, "--onnx", checkpoint.parent, "--force")
    assert code == 2 and stderr.startswith(f"tandem: error: {checkpoint.parent}: is a directory")


def test_a_failed_write_leaves_no_file_behind(capsys, monkeypatch, digits):
    """A disk that fills up mid-write: neither a half-written file nor the temporary one stays,
    and a file that was there is left as it was."""
    checkpoint, _ = digits
    out = checkpoint.with_name("digits.onnx")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shared.export.onnx.os.fsync", disk_full)
    code, _, stderr = tandem(capsys, "export", checkpoint, "--onnx", out)
    assert (code, stderr) == (2, "tandem: error: [Errno 28] No space left on device\n")
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits.safetensors"]

    out.write_bytes(b"the old export")
    assert tandem(capsys, "export", checkpoint, "--onnx", out, "--force")[0] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits.onnx", "digits.safetensors"]
    assert out.read_bytes() == b"the old export"


def test_export_of_a_layer_onnxruntime_cannot_run_is_an_error(capsys, tmp_path):
    model = seeded_model(image_spec([1, 6, 6], {"type": "conv2d", "filters": 2}), dtype=np.float64)
    checkpoint = tmp_path / "f64.safetensors"
    save(checkpoint, model, CheckpointMeta("f64", model.spec, "float64"))
    code, _, stderr = tandem(capsys, "export", checkpoint, "--onnx", tmp_path / "f64.onnx")
    assert code == 2 and stderr.startswith("tandem: error: layer 0 (conv2d): ONNX Runtime's CPU provider")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f64.safetensors"]


@pytest.mark.parametrize("opset", ["12", "99"])
def test_export_of_an_unsupported_opset_is_an_error(capsys, digits, opset):
    checkpoint, _ = digits
    code, _, stderr = tandem(
        capsys, "export", checkpoint, "--onnx", checkpoint.with_name("x.onnx"), "--opset", opset
    )
    assert code == 2 and stderr.startswith(f"tandem: error: opset must be an int from {MIN_OPSET}")


def test_export_without_onnx_says_how_to_install_it(capsys, monkeypatch, digits):
    checkpoint, _ = digits
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.delitem(sys.modules, "shared.export.onnx")
    code, _, stderr = tandem(capsys, "export", checkpoint, "--onnx", checkpoint.with_name("x.onnx"))
    assert code == 2 and "pip install -e '.[onnx]' from the checkout" in stderr


def test_export_help_states_the_default_opset(capsys):
    with pytest.raises(SystemExit):
        tandem(capsys, "export", "--help")
    assert f"(default: {DEFAULT_OPSET}," in " ".join(capsys.readouterr().out.split())


def test_export_flags_are_not_abbreviated(capsys, digits):
    checkpoint, _ = digits
    with pytest.raises(SystemExit) as exit_:
        tandem(capsys, "export", checkpoint, "--onn", checkpoint.with_name("x.onnx"))
    assert exit_.value.code == 2
