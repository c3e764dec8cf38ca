"""Tests for the `tandem` command line (shared.cli) and its progress display (shared.cli.progress)."""

import argparse
import contextlib
import io
import json
import re
import signal
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from shared.checkpoints.checkpoint import load
from shared.cli import build_parser, main
from shared.cli.local import TrainingRun
from shared.cli.output import checkpoint_text
from shared.cli.progress import TerminalProgress, UploadProgress
from shared.data import load_dataset
from shared.nn import EpochEvent, StepEvent
from shared.rpc.stubs import tandem_common_pb2
from tests.helpers import interruptible_module

REPO = Path(__file__).resolve().parent.parent

EPOCH_LINE = re.compile(
    r"^epoch (\d)/2  train loss \d\.\d{4} acc \d+\.\d\d%  test loss \d\.\d{4} acc \d+\.\d\d%  "
    r"\(\d+\.\d s\)$"
)
ACCURACY = re.compile(r"\d+\.\d\d% \(\d+/179\)")
TINY_MLP = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "flatten"},
        {"type": "dense", "units": 16},
        {"type": "relu"},
        {"type": "dense", "units": 10},
    ],
}


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    monkeypatch.delenv("TANDEM_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """digits-cnn trained for 2 epochs, shared by the tests that need a model: (path, output)."""
    path = tmp_path_factory.mktemp("model") / "digits-cnn.safetensors"
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main(["train", "--preset", "digits-cnn", "--epochs", "2", "--seed", "0", "--out", str(path)])
    assert code == 0
    return path, output.getvalue()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


# ---------------------------------------------------------------- train and evaluate


def test_train_prints_epochs_and_final_accuracy_then_saves(trained):
    path, output = trained
    lines = output.splitlines()
    assert [match.group(1) for line in lines[:2] if (match := EPOCH_LINE.match(line))] == ["1", "2"]
    assert re.fullmatch(rf"final test accuracy {ACCURACY.pattern}", lines[2])
    assert lines[3] == f"saved {path}"
    assert len(lines) == 4 and "\r" not in output

    meta = load(path).meta
    assert (meta.model_name, meta.epoch, meta.step) == ("digits-cnn", 2, 102)
    assert meta.dataset == "digits"
    assert meta.hyperparameters["epochs"] == 2
    assert meta.hyperparameters["batch_size"] == 32  # the preset's setting
    assert f"{meta.metrics['test_accuracy']:.2%}" in lines[2]


def test_evaluate_prints_the_accuracy_training_ended_with(trained, capsys):
    path, output = trained
    code, out, err = run(capsys, "evaluate", path, "--dataset", "digits")
    assert (code, err) == (0, "")
    assert "model digits-cnn: epoch 2, step 102, trained on digits" in out
    final = ACCURACY.search(output.splitlines()[2])
    assert final, output
    assert re.search(rf"test loss \d\.\d{{4}}  accuracy {re.escape(final.group())}$", out, re.M)


def test_train_from_spec_file_with_default_name_and_out(tmp_path, monkeypatch, capsys):
    spec_file = write(tmp_path / "tiny.json", TINY_MLP)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        capsys,
        "train",
        "--spec",
        spec_file,
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--validation-split",
        "0.1",
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("epoch 1/2  train loss ")
    assert "  val loss " in lines[0] and "  test loss " in lines[0]
    assert lines[-1] == "saved runs/tiny.safetensors"

    checkpoint = load(tmp_path / "runs" / "tiny.safetensors")
    assert checkpoint.meta.model_name == "tiny"
    assert checkpoint.meta.hyperparameters["validation_split"] == 0.1
    assert checkpoint.model.spec["layers"][1]["units"] == 16


def test_early_stopping_is_reported_and_the_best_weights_saved(tmp_path, capsys):
    spec_file = write(tmp_path / "tiny.json", TINY_MLP)
    out_file = tmp_path / "tiny.safetensors"
    code, out, _ = run(
        capsys,
        "train",
        "--spec",
        spec_file,
        "--out",
        out_file,
        "--epochs",
        "30",
        "--batch-size",
        "64",
        "--validation-split",
        "0.2",
        "--early-stopping-patience",
        "1",
        "--early-stopping-monitor",
        "val_accuracy",
    )
    assert code == 0
    final = re.search(
        r"^final test accuracy (.*)  \(early stopping after epoch (\d+); "
        r"kept the weights of epoch (\d+)\)$",
        out,
        re.M,
    )
    assert final and int(final.group(3)) < int(final.group(2)) < 30

    _, evaluated, _ = run(capsys, "evaluate", out_file, "--dataset", "digits")
    assert f"accuracy {final.group(1)}\n" in evaluated


def test_the_default_output_never_overwrites_and_out_needs_force(tmp_path, monkeypatch, capsys):
    spec_file = write(tmp_path / "tiny.json", TINY_MLP)
    monkeypatch.chdir(tmp_path)
    train = ["train", "--spec", spec_file, "--epochs", "1"]
    saved = [run(capsys, *train)[1].splitlines()[-1] for _ in range(3)]
    assert saved == [f"saved runs/{name}.safetensors" for name in ("tiny", "tiny-2", "tiny-3")]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [  # no partial file left behind
        "tiny-2.safetensors",
        "tiny-3.safetensors",
        "tiny.safetensors",
    ]

    first = (tmp_path / "runs" / "tiny.safetensors").read_bytes()
    code, out, err = run(capsys, *train, "--out", "runs/tiny.safetensors", "--seed", "1")
    assert (code, out) == (2, "")
    assert err == (
        "tandem: error: runs/tiny.safetensors exists; give --force to overwrite it, or another --out\n"
    )
    assert (tmp_path / "runs" / "tiny.safetensors").read_bytes() == first
    code, out, _ = run(capsys, *train, "--out", "runs/tiny.safetensors", "--seed", "1", "--force")
    assert (code, out.splitlines()[-1]) == (0, "saved runs/tiny.safetensors")
    assert load(tmp_path / "runs" / "tiny.safetensors").meta.hyperparameters["seed"] == 1


def test_save_every_saves_the_model_of_each_nth_epoch(tmp_path, capsys):
    out_file = tmp_path / "tiny.safetensors"
    spec_file = write(tmp_path / "tiny.json", TINY_MLP)
    code, _, _ = run(
        capsys, "train", "--spec", spec_file, "--epochs", "3", "--save-every", "2", "--out", out_file
    )
    assert code == 0
    assert load(out_file).meta.epoch == 3  # the final save replaces epoch 2's


def interrupt_training(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `tandem train` (endless epochs) in a process of its own, Ctrl-C it once it has
    printed its second epoch; its result and the lines it printed."""
    argv = interruptible_module("shared.cli", "train", "--preset", "mlp", "--hidden", "16")
    argv += ["--epochs", "1000000", "--out", str(tmp_path / "mlp.safetensors"), *flags]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    watchdog = threading.Timer(60, process.kill)  # bounds the reads below if it never prints
    watchdog.start()
    try:
        lines = [process.stdout.readline(), process.stdout.readline()]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        watchdog.cancel()
        process.kill()
    return subprocess.CompletedProcess(argv, process.returncode, out, err), lines + out.splitlines()


def test_ctrl_c_says_that_nothing_was_saved(tmp_path):
    result, lines = interrupt_training(tmp_path)
    assert re.match(r"epoch +2/1000000  train loss", lines[1]), lines
    finished = sum(line.startswith("epoch ") for line in lines)
    assert result.returncode == 130
    said = re.fullmatch(
        r"tandem: interrupted in epoch (\d+) of 1000000; nothing saved "
        r"\(--save-every N saves the model every N epochs\)\n",
        result.stderr,
    )
    assert said, result.stderr
    # The epoch after the last line printed; or that line's, if Ctrl-C came as it was printed.
    assert int(said[1]) in (finished, finished + 1)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_with_save_every_says_where_the_last_save_is(tmp_path):
    result, _ = interrupt_training(tmp_path, "--save-every", "1")
    assert result.returncode == 130
    said = re.fullmatch(
        r"tandem: interrupted in epoch (\d+) of 1000000; the model of epoch (\d+) is in (\S+)\n",
        result.stderr,
    )
    assert said, result.stderr
    # The epoch being saved when Ctrl-C came may not have made it, but the file holds the one named.
    assert int(said[2]) in (int(said[1]) - 1, int(said[1]) - 2)
    assert Path(said[3]) == tmp_path / "mlp.safetensors"
    assert load(said[3]).meta.epoch == int(said[2])
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.safetensors"]  # no partial file


def test_an_interrupted_run_says_what_its_saves_left(capsys):
    saved: list[EpochEvent] = []
    run = TrainingRun(15, 5, saved.append)
    out = Path("runs/x.safetensors")
    for epoch in range(1, 7):
        assert run.interrupted_text(out).startswith(f"interrupted in epoch {epoch} of 15; ")
        if epoch <= 5:
            assert run.interrupted_text(out).endswith(
                "; nothing saved (the first save of --save-every was due after epoch 5)"
            )
        run(EpochEvent(epoch, 10 * epoch, {**EPOCH_METRICS, "epoch": epoch}))
    assert [event.epoch for event in saved] == [5]
    assert (
        run.interrupted_text(out)
        == "interrupted in epoch 7 of 15; the model of epoch 5 is in runs/x.safetensors"
    )
    assert len(capsys.readouterr().out.splitlines()) == 6  # the epochs' lines


# ---------------------------------------------------------------- predict


def predicted_classes(out: str) -> list[int]:
    return [int(c) for c in re.findall(r"^ +\d+  predicted (\d)", out, re.M)]


def test_predict_from_dataset_shows_labels_top_k_and_accuracy(trained, capsys):
    path, _ = trained
    code, out, _ = run(capsys, "predict", path, "--dataset", "digits", "--limit", "5", "--top-k", "2")
    assert code == 0
    rows = out.splitlines()
    assert len(rows) == 6
    top_2 = r"\d: \d+\.\d\d%  \d: \d+\.\d\d%"
    assert re.fullmatch(rf"   0  predicted \d  true \d( \(wrong\))?  top 2: {top_2}", rows[0])
    assert re.fullmatch(r"accuracy \d+\.\d\d% \(\d/5\)", rows[-1])


@pytest.mark.parametrize("shape", ["flat", "image", "single"])
def test_predict_from_npy_matches_the_dataset(trained, capsys, tmp_path, shape):
    path, _ = trained
    x = load_dataset("digits").x_test[:4]
    samples = {"flat": x.reshape(4, 64), "image": x, "single": x[0]}[shape]
    np.save(tmp_path / "x.npy", samples)

    _, from_dataset, _ = run(capsys, "predict", path, "--dataset", "digits", "--limit", "4")
    code, from_npy, _ = run(capsys, "predict", path, "--npy", tmp_path / "x.npy")
    assert code == 0
    expected = predicted_classes(from_dataset)[: 1 if shape == "single" else 4]
    assert predicted_classes(from_npy) == expected
    assert "true" not in from_npy and "accuracy" not in from_npy


def test_evaluate_and_predict_default_to_the_dataset_the_model_records(trained, capsys):
    path, _ = trained
    code, out, _ = run(capsys, "evaluate", path)
    assert code == 0 and "digits test split, 179 samples" in out
    _, default, _ = run(capsys, "predict", path, "--limit", "4")
    assert default == run(capsys, "predict", path, "--dataset", "digits", "--limit", "4")[1]


# ---------------------------------------------------------------- listings


def test_datasets_and_presets(capsys, tmp_path):
    np.savez(tmp_path / "tiny.npz", x=np.zeros((10, 4), np.float32), y=np.arange(10) % 2)
    code, out, _ = run(capsys, "datasets", "--data-dir", tmp_path)
    assert (code, out) == (0, "digits\ntiny\n")

    code, out, _ = run(capsys, "presets")
    assert code == 0
    assert re.search(r"^digits-cnn +Seed 002: conv", out, re.M)
    settings = "optimizer adam, learning_rate 0.001, batch_size 32, epochs 15"
    assert re.search(rf"^ +hidden 300; {settings}$", out, re.M)


# ---------------------------------------------------------------- bad input


def corrupted_copy(model: Path, directory: Path) -> Path:
    blob = bytearray(model.read_bytes())
    blob[-5] ^= 0xFF  # in the weights, past the header
    copy = directory / "corrupt.safetensors"
    copy.write_bytes(bytes(blob))
    return copy


def no_flatten_spec(directory: Path) -> Path:
    return write(
        directory / "noflat.json",
        {
            "input_shape": [1, 8, 8],
            "layers": [{"type": "conv2d", "filters": 4, "kernel_size": 3}, {"type": "dense", "units": 10}],
        },
    )


def tiny_dataset_dir(directory: Path) -> Path:
    np.savez(directory / "tiny.npz", x=np.zeros((20, 4), np.float32), y=np.arange(20) % 2)
    return directory


def wrong_shape_npy(directory: Path) -> Path:
    np.save(directory / "x.npy", np.zeros((3, 8, 7)))
    return directory / "x.npy"


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda d, m: ["train", "--preset", "nope"], "unknown preset 'nope'"),
        (
            lambda d, m: ["train", "--spec", no_flatten_spec(d)],
            "noflat.json: layer 1 (dense) with input shape (4, 6, 6)",
        ),
        (
            lambda d, m: ["train", "--preset", "mlp", "--dataset", "nope", "--data-dir", d],
            "no dataset named 'nope'",
        ),
        (lambda d, m: ["train", "--preset", "mlp", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (lambda d, m: ["train", "--preset", "mlp", "--lr", "0"], "--lr must be > 0 and at most 100.0"),
        (
            # Checked before any call: nothing listens at port 9 (discard) of 127.0.0.1.
            lambda d, m: [
                "jobs",
                "start",
                "--model-name",
                "m",
                "--preset",
                "mlp",
                "--lr",
                "0",
                "--trainer",
                "127.0.0.1:9",
            ],
            "--lr must be > 0 and at most 100.0",
        ),
        (
            lambda d, m: ["train", "--preset", "mlp", "--early-stopping-patience", "2"],
            "--early-stopping-patience needs --validation-split > 0",
        ),
        (
            lambda d, m: ["train", "--preset", "mlp", "--dataset", "nope", "--data-dir", d],
            "(data dir searched: {d}; pass --data-dir or set TANDEM_DATA_DIR)",
        ),
        (
            lambda d, m: ["train", "--preset", "mlp", "--dataset", "tiny", "--data-dir", tiny_dataset_dir(d)],
            "--batch-size must be between 1 and the 18 training samples, got 64",
        ),
        (
            lambda d, m: ["evaluate", REPO / "README.md"],
            "README.md: not a Tandem checkpoint (not a safetensors file: its header claims ",
        ),
        (
            lambda d, m: ["predict", "--server", m, "--dataset", "digits"],
            "--server takes the HOST:PORT of an inference service, and {m} is a file; "
            "to predict with a model file in this process: tandem predict {m} --dataset digits",
        ),
        (
            lambda d, m: ["predict", "127.0.0.1:50052", "--npy", "x.npy"],
            "MODEL_FILE is a saved model's path, and 127.0.0.1:50052 looks like the HOST:PORT of an "
            "inference service; to ask the service there: "
            "tandem predict --server 127.0.0.1:50052 --model-name NAME --npy x.npy",
        ),
        (
            lambda d, m: ["train", "--preset", "mlp", "--out", m],
            "{m} exists; give --force to overwrite it, or another --out",
        ),
        (lambda d, m: ["train", "--spec", d / "absent.json"], "absent.json: No such file or directory"),
        (
            lambda d, m: ["evaluate", d / "absent.safetensors", "--dataset", "digits"],
            "absent.safetensors: No such file or directory",
        ),
        (
            lambda d, m: ["evaluate", corrupted_copy(m, d), "--dataset", "digits"],
            "corrupt.safetensors: checksum mismatch",
        ),
        (
            lambda d, m: ["evaluate", m, "--dataset", "tiny", "--data-dir", tiny_dataset_dir(d)],
            "dataset 'tiny' has samples of shape [4], but the model in",
        ),
        (
            lambda d, m: ["predict", m, "--npy", wrong_shape_npy(d)],
            "x.npy: shape [3, 8, 7] does not fit the model's samples of shape [1, 8, 8] (or flat [64])",
        ),
        (
            lambda d, m: ["predict", m, "--npy", integer_npy(d)],
            "pixels.npy: samples must be float32 or float64, scaled as the model's training data "
            "(pixels 0..1); found uint8",
        ),
    ],
    ids=[
        "preset",
        "spec",
        "dataset",
        "batch-size",
        "lr",
        "jobs-start-lr",
        "early-stopping",
        "data-dir",
        "batch-size-over-samples",
        "not-a-checkpoint",
        "server-given-a-file",
        "model-file-given-an-address",
        "out-exists",
        "spec-file",
        "model-file",
        "corrupt-model",
        "shape-mismatch",
        "npy-shape",
        "npy-integers",
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(make_argv, message, trained, tmp_path, capsys):
    code, out, err = run(capsys, *make_argv(tmp_path, trained[0]))
    assert code == 2
    assert err.startswith("tandem: error: ") and err.count("\n") == 1
    assert message.format(d=tmp_path, m=trained[0]) in err
    assert out == ""


def integer_npy(directory: Path) -> Path:
    np.save(directory / "pixels.npy", np.zeros((2, 1, 8, 8), np.uint8))
    return directory / "pixels.npy"


def test_usage_errors_return_2_instead_of_exiting(capsys):
    code, _, err = run(capsys, "train", "--preset", "mlp", "--spec", "x.json")
    assert code == 2
    assert "not allowed with argument --preset" in err


def test_a_misspelt_flag_is_refused_by_its_command_with_the_close_match(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # --epoch is not taken for --epochs (argparse's prefix matching is off), and is told
    # before the missing --preset.
    code, out, err = run(capsys, "train", "--epoch", "3")
    assert (code, out) == (2, "")
    assert err.startswith("usage: tandem train [-h]")
    assert err.endswith("tandem train: error: unrecognized argument --epoch; did you mean --epochs?\n")
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing saved

    code, _, err = run(capsys, "jobs", "start", "--preset", "mlp", "--model-name", "m", "--every-step", "5")
    assert code == 2
    assert err.startswith("usage: tandem jobs start [-h]")
    assert "tandem jobs start: error: unrecognized argument --every-step; did you mean --every-steps?" in err


@pytest.mark.parametrize(
    "argv, usage, message",
    [
        (
            ["jobs", "strat"],
            "usage: tandem jobs [-h] COMMAND ...",
            "tandem jobs: error: unknown command 'strat'; did you mean start? "
            "(commands: start, list, watch, cancel, checkpoints, datasets, upload, plot)",
        ),
        (
            ["predcit", "--limit", "3"],
            "usage: tandem [-h] [--version] COMMAND ...",
            "tandem: error: unknown command 'predcit'; did you mean predict? "
            "(commands: train, evaluate, predict, datasets, presets, jobs, export)",
        ),
        (
            ["presets", "all"],
            "usage: tandem presets [-h]",
            "tandem presets: error: unrecognized arguments: all",
        ),
    ],
)
def test_an_unknown_command_is_told_with_the_close_match(argv, usage, message, capsys):
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.splitlines() == [usage, message]


def test_version_is_the_installed_packages(capsys):
    assert run(capsys, "--version") == (0, f"tandem {metadata.version('tandem')}\n", "")


def all_parsers(parser: argparse.ArgumentParser, name: str = "tandem"):
    """(`tandem jobs start`, its parser) for the parser and every subcommand's, recursively."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                yield from all_parsers(subparser, f"{name} {command}")


def test_every_argument_of_every_command_has_help():
    parsers = dict(all_parsers(build_parser()))
    assert {"tandem jobs upload", "tandem jobs datasets", "tandem evaluate"} <= parsers.keys()
    missing = []
    for name, parser in parsers.items():
        assert not parser.allow_abbrev, name
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):  # each command's line in the list
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
            if not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.metavar}")
    assert missing == []


def test_help_documents_the_input_format_and_the_dataset_defaults(capsys):
    parser = dict(all_parsers(build_parser()))
    predict = parser["tandem predict"].format_help()
    assert re.search(r"\[N,\s+\*input_shape\]", predict) and "float32 or float64" in predict
    assert "0..1" in predict
    for command in ("tandem evaluate", "tandem predict"):
        help_ = parser[command].format_help()
        assert re.search(r"default:\s+the\s+dataset\s+the\s+model\s+file\s+records", help_)
    for command in ("tandem train", "tandem jobs start"):
        help_ = parser[command].format_help()
        assert re.search(r"--dataset NAME .*\(default:\s+digits\)", help_, re.S)
        assert re.search(r"README.md's\s+section\s+'The\s+model\s+spec'", help_)


# ---------------------------------------------------------------- the console script


def test_console_script_runs(trained):
    path, output = trained
    tandem = Path(sys.executable).parent / "tandem"
    result = subprocess.run(
        [tandem, "evaluate", path, "--dataset", "digits"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")
    final = ACCURACY.search(output.splitlines()[2])
    assert final, output
    assert final.group() in result.stdout


def test_python_m_shared_cli_runs_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "presets"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert re.search(r"^digits-cnn +Seed 002: conv", result.stdout, re.M)


# ---------------------------------------------------------------- progress display


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self) -> float:
        return next(self.times)


EPOCH_METRICS = {
    "epoch": 1,
    "train_loss": 0.5,
    "train_accuracy": 0.875,
    "test_loss": 0.25,
    "test_accuracy": 0.9375,
    "seconds": 2.0,
}


def feed(progress: TerminalProgress, steps: int = 4) -> None:
    """One epoch of `steps` steps (losses 1, 2, ...; accuracy 0.5), then its end."""
    for step in range(1, steps + 1):
        progress(StepEvent(1, step, steps, float(step), 0.5))
    progress(EpochEvent(1, steps, EPOCH_METRICS))


def test_progress_on_a_terminal_redraws_at_most_every_interval(capsys):
    stream = FakeTty()
    # Steps at t = 0, 0.05, 0.12, 0.15: the second and fourth come too soon after
    # a redraw, but the fourth is the epoch's last and is drawn anyway.
    feed(TerminalProgress(15, stream, clock=FakeClock([0.0, 0.05, 0.12, 0.15])))
    status = "epoch 1/15 [{}] {}/4  loss {:.4f}  acc 50.0%"
    assert stream.getvalue().split("\r")[1:] == [
        status.format("####..............", 1, 1.0),
        status.format("#############.....", 3, 2.0),
        status.format("##################", 4, 2.5),
        " " * len(status.format("#" * 18, 4, 2.5)),  # cleared for the epoch line
        "epoch  1/15  train loss 0.5000 acc 87.50%  test loss 0.2500 acc 93.75%  (2.0 s)\n",
    ]
    assert capsys.readouterr().out == ""


def test_progress_follows_the_step_numbers_of_thinned_out_steps():
    """A job watched on the trainer sends only some steps' events (`tandem jobs watch`)."""
    stream = FakeTty()
    progress = TerminalProgress(2, stream, clock=FakeClock([0.0, 1.0]))
    progress(StepEvent(2, 12, 10, 1.0, 0.5))  # the 2nd step of epoch 2
    progress(StepEvent(2, 19, 10, 3.0, 1.0))  # its 9th
    status = "epoch 2/2 [{}] {}/10  loss {:.4f}  acc {:.1%}"
    assert stream.getvalue().split("\r")[1:] == [
        status.format("###...............", 2, 1.0, 0.5),
        status.format("################..", 9, 2.0, 0.75),  # means over the steps shown
    ]


def test_progress_elsewhere_prints_only_epoch_lines():
    stream = io.StringIO()
    feed(TerminalProgress(2, stream, clock=FakeClock([])))  # the clock is never read
    assert stream.getvalue() == (
        "epoch 1/2  train loss 0.5000 acc 87.50%  test loss 0.2500 acc 93.75%  (2.0 s)\n"
    )


def test_progress_close_clears_a_status_line():
    stream = FakeTty()
    progress = TerminalProgress(2, stream, clock=FakeClock([0.0]))
    progress(StepEvent(1, 1, 10, 1.0, 0.5))
    progress.close()
    drawn = "epoch 1/2 [#.................] 1/10  loss 1.0000  acc 50.0%"
    assert stream.getvalue() == f"\r{drawn}\r{' ' * len(drawn)}\r"


def test_upload_progress_draws_bytes_on_a_terminal_then_one_line():
    stream = FakeTty()
    progress = UploadProgress("fashion", stream, clock=FakeClock([0.0, 0.05, 0.2]))
    for sent in (0, 2**20, 2 * 2**20):  # the second comes too soon; the last is always drawn
        progress(sent, 2 * 2**20)
    progress.finish()
    drawn = "uploading fashion [##################] 2.0/2.0 MiB"
    assert stream.getvalue().split("\r")[1:] == [
        "uploading fashion [..................] 0.0/2.0 MiB",
        drawn,
        " " * len(drawn),
        "sent 2.0 MiB\n",
    ]


def test_upload_progress_elsewhere_prints_only_the_final_line():
    stream = io.StringIO()
    progress = UploadProgress("fashion", stream, clock=FakeClock([]))
    progress(0, 3 * 2**20)
    progress(3 * 2**20, 3 * 2**20)
    progress.finish()
    assert stream.getvalue() == "sent 3.0 MiB\n"


# ---------------------------------------------------------------- output


def checkpoint_info(epoch: int, metrics_epoch: int) -> tandem_common_pb2.CheckpointInfo:
    return tandem_common_pb2.CheckpointInfo(
        model_name="digits",
        version=7,
        epoch=epoch,
        step=140,
        metrics={"epoch": metrics_epoch, "test_accuracy": 0.9721},
    )


def test_a_mid_epoch_checkpoint_says_which_epoch_its_accuracy_is_from():
    assert checkpoint_text(checkpoint_info(3, 2)) == (
        "digits version 7 (epoch 3, step 140, test accuracy 97.21% at the end of epoch 2)"
    )
    at_its_end = checkpoint_text(checkpoint_info(3, 3))
    assert at_its_end == "digits version 7 (epoch 3, step 140, test accuracy 97.21%)"
