"""`tandem predict`: predictions for some samples, from a saved model in this process or from a
model an inference service serves (--server); only where the probabilities come from differs."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from shared.cli.flags import connection, connection_flags, data_dir_flag, positive_int
from shared.cli.models import ServedModel, load_dataset_for, read_checkpoint
from shared.cli.output import accuracy_text
from shared.client import InferenceClient
from shared.nn import Model, as_batch, top_k

DEFAULT_INFERENCE = "127.0.0.1:50052"  # where `python -m infer_svc` listens by default


def add_predict(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "predict",
        parents=[data_dir_flag(), connection_flags()],
        help="predictions for some samples, from a saved model or an inference service",
        description="Predict with the model in MODEL_FILE, in this process, or with a model an "
        "inference service serves (--server); give one of the two.",
    )
    parser.add_argument(
        "model", metavar="MODEL_FILE", nargs="?", help="a saved model (tandem train's output)"
    )
    server = parser.add_argument_group("through an inference service")
    default_server = os.environ.get("TANDEM_INFERENCE", DEFAULT_INFERENCE)
    server.add_argument(
        "--server",
        metavar="HOST:PORT",
        nargs="?",
        const=default_server,
        help=f"ask the inference service at HOST:PORT (without a value: $TANDEM_INFERENCE, "
        f"else {DEFAULT_INFERENCE})",
    )
    server.add_argument("--model-name", metavar="NAME", help="the served model to ask (needed)")
    server.add_argument(
        "--version",
        type=positive_int,
        metavar="V",
        help="a version still in the store (default: the one the service serves)",
    )
    samples = parser.add_mutually_exclusive_group(required=True)
    samples.add_argument("--dataset", metavar="NAME", help="predict the dataset's test split")
    samples.add_argument("--npy", metavar="FILE.npy", help="predict the samples in a .npy array")
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=10,
        metavar="N",
        help="predict the first N samples (default: 10)",
    )
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=3,
        metavar="K",
        help="show the K most probable classes (default: 3)",
    )
    parser.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> None:
    with model_to_predict_with(args) as (model, model_text):
        x, labels = predict_samples(args, model, model_text)
        probabilities = model.predict_proba(x)
    print_predictions(probabilities, labels, args.top_k)
    if isinstance(model, ServedModel):
        print(f"answered by {model.name} version {model.version} at {args.server}")


@contextmanager
def model_to_predict_with(args: argparse.Namespace) -> Iterator[tuple[Model | ServedModel, str]]:
    """The model in MODEL_FILE, or the one served at --server; with how errors name it."""
    if (args.model is None) == (args.server is None):
        raise ValueError("give a MODEL_FILE or --server HOST:PORT (with --model-name), one of the two")
    if args.server is None:
        if args.model_name or args.version:
            raise ValueError("--model-name and --version apply to --server only; MODEL_FILE holds one model")
        yield read_checkpoint(args.model).model, f"the model in {args.model}"
        return
    if not args.model_name:
        raise ValueError("--server needs --model-name NAME: the served model to ask")
    with InferenceClient(args.server, connection=connection(args)) as client:
        yield (
            ServedModel(client, args.model_name, args.version),
            f"model {args.model_name!r} at {args.server}",
        )


def predict_samples(
    args: argparse.Namespace,
    model: Model | ServedModel,
    model_text: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The samples to predict (the first --limit) and, from a dataset's test split, their labels."""
    if args.dataset:
        dataset = load_dataset_for(model, args.dataset, args.data_dir, model_text)
        return dataset.x_test[: args.limit], dataset.y_test[: args.limit]
    return read_samples(args.npy, model.input_shape)[: args.limit], None


def read_samples(path: str, input_shape: tuple[int, ...]) -> np.ndarray:
    """A .npy array as a batch: one sample or N of them, each of the input shape or flat."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:  # not a .npy file, or an object array
        raise ValueError(f"{path}: cannot load: {error}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError(f"{path}: expected a single array (.npy), found an .npz archive")
    try:
        return as_batch(array, input_shape)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def print_predictions(probabilities: np.ndarray, labels: np.ndarray | None, k: int) -> None:
    """A line per sample with its k most probable classes; with labels, whether it is right, and
    the accuracy."""
    top, _ = top_k(probabilities, k)
    for row, classes in enumerate(top):
        line = f"{row:>4}  predicted {classes[0]}"
        if labels is not None:
            line += f"  true {labels[row]}" + ("" if labels[row] == classes[0] else " (wrong)")
        ranked = "  ".join(f"{c}: {probabilities[row, c]:.2%}" for c in classes)
        print(f"{line}  top {len(classes)}: {ranked}")
    if labels is not None:
        correct = int((top[:, 0] == labels).sum())
        print(f"accuracy {accuracy_text(correct, len(labels))}")
