"""`tandem`: train models, evaluate them and query them from the command line.

    tandem train --preset digits-cnn --epochs 5
    tandem train --spec my_model.json --dataset fashion-mnist --data-dir ~/data
    tandem evaluate runs/digits-cnn.safetensors --dataset digits
    tandem predict runs/digits-cnn.safetensors --dataset digits --limit 5
    tandem predict runs/digits-cnn.safetensors --npy samples.npy
    tandem datasets
    tandem presets

Bad input (an unknown preset or dataset, a spec that cannot work, a bad
setting, a missing or corrupt file) is reported as `tandem: error: ...` on
stderr with exit code 2, like a usage error, and without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from shared.checkpoint import (Checkpoint, CheckpointError, CheckpointMeta, check_model_name,
                               load, save)
from shared.data import Dataset, list_datasets, load_dataset
from shared.nn import OPTIMIZERS, Model, SpecError, build_model, evaluate
from shared.nn.presets import PRESETS, get_preset
from shared.nn.optim import LR_SCHEDULES
from shared.nn.train import MONITORS
from shared.progress import Progress
from shared.training import Hyperparameters, train

EXIT_ERROR = 2         # the exit code argparse uses for usage errors
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C

# (flag, Hyperparameters field, type, help). A flag left out is None, which
# keeps the preset's tuned setting, or else the Hyperparameters default.
HYPERPARAMETER_FLAGS = [
    ("--epochs", "epochs", int, "passes over the training data"),
    ("--batch-size", "batch_size", int, "samples per step"),
    ("--optimizer", "optimizer", str, f"one of: {', '.join(OPTIMIZERS)}"),
    ("--lr", "learning_rate", float, "learning rate"),
    ("--lr-schedule", "lr_schedule", str, f"one of: {', '.join(LR_SCHEDULES)}"),
    ("--momentum", "momentum", float, "momentum of the momentum and nesterov optimizers"),
    ("--weight-decay", "weight_decay", float, "weight decay, in [0, 1)"),
    ("--seed", "seed", int, "seed of the initial weights and of the shuffling"),
    ("--dtype", "dtype", str, "float32 or float64"),
    ("--validation-split", "validation_split", float,
     "fraction of the training data held out for val metrics"),
    ("--early-stopping-patience", "early_stopping_patience", int,
     "stop after this many epochs without improvement (needs --validation-split)"),
    ("--early-stopping-monitor", "early_stopping_monitor", str, f"one of: {', '.join(MONITORS)}"),
]
METAVARS = {int: "N", float: "X", str: "NAME"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse has already reported
        return exit_.code
    try:
        args.run(args)
    except BrokenPipeError:  # the reader went away, as in `tandem predict ... | head`
        # Point stdout at /dev/null, or Python fails again flushing it at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    # SpecError, CheckpointError and DatasetError are ValueErrors; DatasetNotFound is a LookupError.
    except (ValueError, LookupError, OSError) as error:
        print(f"tandem: error: {describe(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def describe(error: Exception) -> str:
    """The error's message; for a file error, `path: reason` rather than `[Errno 2] ...`."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    return str(error)


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", description="Train, evaluate and query Tandem's NumPy models.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument(
        "--data-dir", metavar="DIR",
        help="where to look for datasets (default: $TANDEM_DATA_DIR, else /usr/share/datasets)")

    train_parser = commands.add_parser(
        "train", parents=[data_dir], help="train a model and save it")
    architecture = train_parser.add_mutually_exclusive_group(required=True)
    architecture.add_argument(
        "--preset", metavar="NAME", help="a named architecture (see `tandem presets`)")
    architecture.add_argument(
        "--spec", metavar="FILE.json", help="a model spec (see shared/nn/spec.py)")
    train_parser.add_argument("--hidden", type=widths, metavar="W1,W2,...",
                        help="hidden layer widths, instead of the preset's")
    train_parser.add_argument("--dataset", default="digits", metavar="NAME", help="default: digits")
    train_parser.add_argument(
        "--name", help="the model's name (default: the preset's name or the spec file's stem)")
    train_parser.add_argument(
        "--out", metavar="PATH", help="checkpoint to write (default: runs/<name>.safetensors)")
    settings = train_parser.add_argument_group(
        "hyperparameters",
        "Unset ones keep the preset's tuned settings (see `tandem presets`), "
        "else the defaults below.")
    for flag, field, type_, help_ in HYPERPARAMETER_FLAGS:
        settings.add_argument(flag, dest=field, type=type_, metavar=METAVARS[type_],
                              help=f"{help_} (default: {getattr(Hyperparameters, field)})")
    train_parser.set_defaults(run=run_train)

    evaluate_parser = commands.add_parser(
        "evaluate", parents=[data_dir],
        help="a saved model's loss and accuracy on a dataset's test split")
    evaluate_parser.add_argument("model", metavar="MODEL_FILE")
    evaluate_parser.add_argument("--dataset", required=True, metavar="NAME")
    evaluate_parser.set_defaults(run=run_evaluate)

    predict_parser = commands.add_parser(
        "predict", parents=[data_dir], help="a saved model's predictions for some samples")
    predict_parser.add_argument("model", metavar="MODEL_FILE")
    samples = predict_parser.add_mutually_exclusive_group(required=True)
    samples.add_argument("--dataset", metavar="NAME", help="predict the dataset's test split")
    samples.add_argument("--npy", metavar="FILE.npy", help="predict the samples in a .npy array")
    predict_parser.add_argument("--limit", type=positive_int, default=10, metavar="N",
                         help="predict the first N samples (default: 10)")
    predict_parser.add_argument("--top-k", type=positive_int, default=3, metavar="K",
                         help="show the K most probable classes (default: 3)")
    predict_parser.set_defaults(run=run_predict)

    datasets_parser = commands.add_parser("datasets", parents=[data_dir], help="list the datasets")
    datasets_parser.set_defaults(run=run_datasets)
    presets_parser = commands.add_parser("presets", help="list the preset architectures")
    presets_parser.set_defaults(run=run_presets)
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def widths(text: str) -> tuple[int, ...]:
    """`256,128,100` -> (256, 128, 100)."""
    try:
        return tuple(positive_int(part) for part in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected positive widths separated by commas, like 256,128,100; got {text!r}"
        ) from None


# ---------------------------------------------------------------- the commands


def run_train(args: argparse.Namespace) -> None:
    hp = hyperparameters(args)
    dataset = load_dataset(args.dataset, args.data_dir, dtype=hp.dtype)
    spec = model_spec(args, dataset)
    name = check_model_name(args.name or args.preset or Path(args.spec).stem)
    out = Path(args.out or f"runs/{name}.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)  # before training, so a bad path fails fast

    progress = Progress(hp.epochs)
    try:
        trained = train(spec, dataset, hp, callback=progress)
    finally:
        progress.close()
    history = trained.history
    last = history.epochs[-1]
    # Scored afresh: early stopping may have restored an earlier epoch's weights.
    _, correct = score_test_split(trained.model, dataset)
    summary = f"final test accuracy {accuracy_text(correct, len(dataset.y_test))}"
    if history.stop_reason == "early_stopping":  # the CLI never stops training otherwise
        summary += (f"  (early stopping after epoch {last['epoch']}; "
                    f"kept the weights of epoch {history.best_epoch})")
    print(summary)

    save(out, trained.model, CheckpointMeta(
        model_name=name, spec=trained.model.spec, dtype=hp.dtype, step=history.steps,
        epoch=history.weights_epoch, metrics=history.weights_metrics, dataset=dataset.name,
        hyperparameters=hp.as_dict(),
    ))
    print(f"saved {out}")


def hyperparameters(args: argparse.Namespace) -> Hyperparameters:
    given = {field: getattr(args, field) for _, field, _, _ in HYPERPARAMETER_FLAGS}
    if args.preset:
        return Hyperparameters.for_preset(args.preset, **given)
    return Hyperparameters(**{field: value for field, value in given.items() if value is not None})


def model_spec(args: argparse.Namespace, dataset: Dataset) -> dict:
    """The preset's spec for the dataset's shape and classes, or the spec file's contents."""
    if args.preset:
        return get_preset(args.preset).spec(dataset.input_shape, dataset.num_classes, args.hidden)
    if args.hidden:
        raise ValueError("--hidden applies to --preset only; a spec file sets its own layer widths")
    with open(args.spec) as f:
        try:
            spec = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{args.spec}: not valid JSON: {error}") from None
    try:
        build_model(spec)  # train() builds it too; checked here to name the file in the error
    except SpecError as error:
        raise SpecError(f"{args.spec}: {error}") from None
    return spec


def run_evaluate(args: argparse.Namespace) -> None:
    checkpoint = read_checkpoint(args.model)
    dataset = load_dataset_for(checkpoint.model, args.dataset, args.data_dir, args.model)
    meta = checkpoint.meta
    print(f"model {meta.model_name}: epoch {meta.epoch}, step {meta.step}, "
          f"trained on {meta.dataset or 'an unnamed dataset'}")
    loss, correct = score_test_split(checkpoint.model, dataset)
    print(f"{dataset.name} test split, {len(dataset.y_test)} samples")
    print(f"test loss {loss:.4f}  accuracy {accuracy_text(correct, len(dataset.y_test))}")


def run_predict(args: argparse.Namespace) -> None:
    model = read_checkpoint(args.model).model
    if args.dataset:
        dataset = load_dataset_for(model, args.dataset, args.data_dir, args.model)
        x, labels = dataset.x_test[:args.limit], dataset.y_test[:args.limit]
    else:
        x, labels = read_samples(args.npy, model.input_shape)[:args.limit], None

    probabilities = model.predict_proba(x)
    # Most probable first; a stable sort breaks ties by class index, as argmax does.
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :args.top_k]
    for row, classes in enumerate(top):
        line = f"{row:>4}  predicted {classes[0]}"
        if labels is not None:
            line += f"  true {labels[row]}" + ("" if labels[row] == classes[0] else " (wrong)")
        ranked = "  ".join(f"{c}: {probabilities[row, c]:.2%}" for c in classes)
        print(f"{line}  top {len(classes)}: {ranked}")
    if labels is not None:
        correct = int((top[:, 0] == labels).sum())
        print(f"accuracy {accuracy_text(correct, len(labels))}")


def run_datasets(args: argparse.Namespace) -> None:
    for name in list_datasets(args.data_dir):
        print(name)


def run_presets(args: argparse.Namespace) -> None:
    width = max(map(len, PRESETS))
    for preset in PRESETS.values():
        hidden = ",".join(map(str, preset.default_hidden))
        training = ", ".join(f"{key} {value}" for key, value in preset.training.items())
        print(f"{preset.name:<{width}}  {preset.description}")
        print(f"{'':<{width}}  hidden {hidden}; {training}")


# ---------------------------------------------------------------- shared steps


def read_checkpoint(path: str) -> Checkpoint:
    try:
        return load(path)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


def load_dataset_for(model: Model, name: str, data_dir: str | None, model_path: str) -> Dataset:
    """Load dataset `name` in the model's dtype; refuse it if its samples do not fit the model."""
    dataset = load_dataset(name, data_dir, dtype=model.dtype)
    if dataset.input_shape != model.input_shape:
        raise ValueError(
            f"dataset {name!r} has samples of shape {list(dataset.input_shape)}, "
            f"but the model in {model_path} takes {list(model.input_shape)}")
    if dataset.num_classes > model.num_classes:
        raise ValueError(
            f"dataset {name!r} has {dataset.num_classes} classes, "
            f"but the model in {model_path} tells only {model.num_classes} apart")
    return dataset


def read_samples(path: str, input_shape: tuple[int, ...]) -> np.ndarray:
    """A .npy array as a batch: one sample or N of them, each of the input shape or flat."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:  # not a .npy file, or an object array
        raise ValueError(f"{path}: cannot load: {error}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError(f"{path}: expected a single array (.npy), found an .npz archive")
    flat = (math.prod(input_shape),)
    for sample in (input_shape, flat):
        if array.shape == sample:
            return array.reshape(1, *input_shape)
        if array.shape[1:] == sample:
            return array.reshape(len(array), *input_shape)
    raise ValueError(
        f"{path} holds an array of shape {list(array.shape)}; the model takes samples of shape "
        f"{list(input_shape)} (or flat {list(flat)}): one, or a batch of them")


def score_test_split(model: Model, dataset: Dataset) -> tuple[float, int]:
    """(mean loss, number of correct predictions) on the dataset's test split."""
    loss, accuracy = evaluate(model, dataset.x_test, dataset.y_test)
    return loss, round(accuracy * len(dataset.y_test))


def accuracy_text(correct: int, total: int) -> str:
    return f"{correct / total:.2%} ({correct}/{total})"


if __name__ == "__main__":
    sys.exit(main())
