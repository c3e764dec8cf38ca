"""The inference client (shared.client.InferenceClient) and `tandem predict --server`, against
real inference servers on 127.0.0.1 over a real Redis (tests/inference_harness.py).

Answers are compared with the NumPy core's own forward pass on the same
weights, and the server path of `tandem predict` with its local path on
the same model saved to a file.
"""

import re

import grpc
import numpy as np
import pytest

from shared.checkpoints import checkpoint
from shared.checkpoints.checkpoint import CheckpointMeta
from shared.cli import main
from shared.client import InferenceClient
from shared.data import load_dataset
from shared.embedded.redis_server import free_loopback_port
from tests.inference_harness import DEADLINE, NAME, assert_close, core_probabilities, publish, samples


@pytest.fixture(autouse=True)
def _no_environment_defaults(monkeypatch):
    for variable in ("TANDEM_INFERENCE", "TANDEM_DATA_DIR"):
        monkeypatch.delenv(variable, raising=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the client


def test_predict_decodes_the_answer_to_numpy(checkpoints, start_inference):
    version, model = publish(checkpoints, seed=0)
    inference = start_inference()
    x = samples(5)

    with InferenceClient(inference.address) as client:
        prediction = client.predict(NAME, x, top_k=3)
        flat64 = client.predict(NAME, x.astype(np.float64).reshape(5, -1))

    expected = core_probabilities(model, x)
    assert (prediction.model_name, prediction.version) == (NAME, version)
    assert prediction.probabilities.dtype == np.float32 and prediction.probabilities.shape == (5, 10)
    assert_close(prediction.probabilities, expected)
    assert prediction.classes.dtype == np.int64
    assert prediction.classes.tolist() == expected.argmax(axis=1).tolist()
    top = np.argsort(-expected, axis=1, kind="stable")[:, :3]
    assert prediction.top_k_classes.tolist() == top.tolist()
    assert_close(prediction.top_k_probabilities, np.take_along_axis(expected, top, axis=1))
    assert_close(flat64.probabilities, expected)
    assert flat64.top_k_classes.shape == flat64.top_k_probabilities.shape == (5, 0)


def test_versions_metadata_and_the_model_list(checkpoints, start_inference):
    _, old = publish(checkpoints, seed=0)
    latest, _ = publish(checkpoints, seed=1)
    inference = start_inference()
    x = samples(2)

    with InferenceClient(inference.address) as client:
        older = client.predict(NAME, x, version=1)
        metadata = client.model_metadata(NAME)
        older_metadata = client.model_metadata(NAME, version=1)
        models = client.list_models()

    assert older.version == 1
    assert_close(older.probabilities, core_probabilities(old, x))
    assert (metadata.version, list(metadata.available_versions)) == (latest, [1, 2])
    assert (list(metadata.input_shape), metadata.num_classes, metadata.dtype) == ([1, 8, 8], 10, "float32")
    assert (older_metadata.version, older_metadata.checkpoint.latest) == (1, False)
    assert [(m.model_name, m.version) for m in models] == [(NAME, latest)]


def test_a_refused_call_raises_with_the_servers_status(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    inference = start_inference()
    with InferenceClient(inference.address) as client:
        for call, status in [
            (lambda: client.predict("nope", samples(1)), grpc.StatusCode.NOT_FOUND),
            (lambda: client.predict(NAME, samples(1), version=9), grpc.StatusCode.NOT_FOUND),
            (lambda: client.predict(NAME, np.zeros((1, 8, 8), np.int32)), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: client.model_metadata("nope"), grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == status


def test_wait_until_ready_waits_for_a_first_version(checkpoints, start_inference):
    inference = start_inference()  # live, with nothing to serve yet
    with InferenceClient(inference.address) as client:
        with pytest.raises(grpc.RpcError) as waited:
            client.wait_until_ready(timeout=0.2)
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        publish(checkpoints, seed=0)
        client.wait_until_ready(timeout=DEADLINE)
        assert client.predict(NAME, samples(1)).version == 1


def test_wait_until_ready_is_bounded_with_no_server():
    with (
        InferenceClient(f"127.0.0.1:{free_loopback_port()}") as client,  # nothing listens there
        pytest.raises(grpc.RpcError) as waited,
    ):
        client.wait_until_ready(timeout=0.2)
    assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# ---------------------------------------------------------------- tandem predict --server


@pytest.fixture
def served_and_saved(checkpoints, start_inference, tmp_path):
    """One model, published to the server's store and saved to a file: (server address, file)."""
    _, model = publish(checkpoints, seed=0)
    path = tmp_path / "digits.safetensors"
    checkpoint.save(path, model, CheckpointMeta(NAME, model.spec, "float32", dataset="digits"))
    return start_inference().address, path


def prediction_rows(out: str) -> list[tuple[str, list[float]]]:
    """Each sample's line without its percentages, and the percentages as numbers."""
    return [
        (re.sub(r"\d+\.\d\d%", "P", line), [float(p) for p in re.findall(r"(\d+\.\d\d)%", line)])
        for line in out.splitlines()
        if re.match(r" +\d+  predicted", line)
    ]


def assert_same_predictions(local: str, served: str) -> None:
    """The same lines; percentages equal up to float rounding (a different process computed them)."""
    local_rows, served_rows = prediction_rows(local), prediction_rows(served)
    assert [text for text, _ in served_rows] == [text for text, _ in local_rows]
    np.testing.assert_allclose([p for _, p in served_rows], [p for _, p in local_rows], atol=0.011)


def test_predict_through_the_server_prints_what_the_model_file_does(served_and_saved, capsys):
    address, path = served_and_saved
    _, local, _ = run(capsys, "predict", path, "--dataset", "digits", "--limit", "20", "--top-k", "2")
    code, served, err = run(
        capsys,
        "predict",
        "--server",
        address,
        "--model-name",
        NAME,
        "--dataset",
        "digits",
        "--limit",
        "20",
        "--top-k",
        "2",
    )
    assert (code, err) == (0, "")
    assert_same_predictions(local, served)
    local_lines, served_lines = local.splitlines(), served.splitlines()
    assert len(served_lines) == len(local_lines) + 1 == 22
    assert re.fullmatch(r"accuracy \d+\.\d\d% \(\d+/20\)", served_lines[-2])
    assert served_lines[-2] == local_lines[-1]
    assert served_lines[-1] == f"answered by {NAME} version 1 at {address}"


def test_predict_npy_through_the_server_and_the_default_address(
    served_and_saved, capsys, tmp_path, monkeypatch
):
    address, path = served_and_saved
    x = load_dataset("digits").x_test[:3]
    np.save(tmp_path / "flat.npy", x.reshape(3, 64).astype(np.float64))
    _, local, _ = run(capsys, "predict", path, "--npy", tmp_path / "flat.npy")

    monkeypatch.setenv("TANDEM_INFERENCE", address)  # --server without a value uses it
    code, served, err = run(
        capsys, "predict", "--server", "--model-name", NAME, "--npy", tmp_path / "flat.npy", "--version", "1"
    )
    assert (code, err) == (0, "")
    assert_same_predictions(local, served)
    assert "true" not in served and "accuracy" not in served
    assert served.splitlines()[-1] == f"answered by {NAME} version 1 at {address}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--dataset", "digits"], "give a MODEL_FILE or --server HOST:PORT"),
        (
            [
                "predict",
                "m.safetensors",
                "--server",
                "127.0.0.1:1",
                "--model-name",
                NAME,
                "--dataset",
                "digits",
            ],
            "give a MODEL_FILE or --server HOST:PORT",
        ),
        (["predict", "--server", "127.0.0.1:1", "--dataset", "digits"], "--server needs --model-name NAME"),
        (
            ["predict", "m.safetensors", "--model-name", NAME, "--dataset", "digits"],
            "--model-name and --version apply to --server only",
        ),
    ],
    ids=["neither", "both", "no-model-name", "model-name-with-file"],
)
def test_predict_needs_a_model_file_or_a_server(argv, message, capsys):
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("tandem: error: ") and message in err and err.count("\n") == 1


def test_predict_reports_what_the_server_refuses(served_and_saved, capsys):
    address, _ = served_and_saved
    code, out, err = run(
        capsys, "predict", "--server", address, "--model-name", "nope", "--dataset", "digits"
    )
    assert (code, out) == (2, "")
    assert err.startswith("tandem: error: NOT_FOUND: ")

    code, _, err = run(
        capsys, "predict", "--server", address, "--model-name", NAME, "--dataset", "digits", "--version", "7"
    )
    assert code == 2 and err.startswith("tandem: error: NOT_FOUND: ")


def test_predict_from_an_unreachable_server_says_what_to_check(capsys):
    address = f"127.0.0.1:{free_loopback_port()}"  # nothing listens there
    code, out, err = run(capsys, "predict", "--server", address, "--model-name", NAME, "--dataset", "digits")
    assert (code, out) == (2, "")
    assert err.startswith("tandem: error: UNAVAILABLE: ")
    assert f"is an inference service at {address}" in err
