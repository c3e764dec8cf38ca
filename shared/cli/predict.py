"""`tandem predict`: predictions for some samples, from a saved model in this process or from a
model an inference service serves (--server); only where the probabilities come from differs."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from shared.cli.flags import (
    add_model_dataset_flag,
    connection,
    connection_flags,
    data_dir_flag,
    model_dataset,
    positive_int,
)
from shared.cli.models import ServedModel, load_dataset_for, read_checkpoint
from shared.cli.output import accuracy_text
from shared.client import InferenceClient
from shared.nn import Model, as_batch, top_k

DEFAULT_INFERENCE = "127.0.0.1:50052"  # where `python -m infer_svc` listens by default
# HOST:PORT as people type it: a name or IPv4 address, or an [IPv6] address, and a port.
ADDRESS = re.compile(r"([\w.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}")
INPUT_FORMAT = (
    "Samples (--npy) are an .npy array of shape [N, *input_shape], e.g. [N, 1, 8, 8] for digits "
    "(or [N, features] flat, or one sample without the N), float32 or float64, scaled as the "
    "dataset the model was trained on: Tandem's datasets hold pixels as 0..1 (digits' 0..16 and "
    "IDX or .npz files' 0..255 divided by their maximum)."
)


def add_predict(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "predict",
        parents=[data_dir_flag(), connection_flags()],
        help="predictions for some samples, from a saved model or an inference service",
        description="Predict with the model in MODEL_FILE, in this process, or with a model an "
        "inference service serves (--server); give one of the two. " + INPUT_FORMAT,
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
    samples = parser.add_mutually_exclusive_group()
    add_model_dataset_flag(samples, "predict the dataset's test split, unless --npy is given")
    samples.add_argument(
        "--npy",
        metavar="FILE.npy",
        help="predict the samples in a .npy array: [N, *input_shape] (or one sample), float32 or "
        "float64, scaled as the model's training data (pixels 0..1)",
    )
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
    with model_to_predict_with(args) as (model, model_text, trained_on):
        x, labels = predict_samples(args, model, model_text, trained_on)
        probabilities = model.predict_proba(x)
    print_predictions(probabilities, labels, args.top_k)
    if isinstance(model, ServedModel):
        print(f"answered by {model.name} version {model.version} at {args.server}")


@contextmanager
def model_to_predict_with(args: argparse.Namespace) -> Iterator[tuple[Model | ServedModel, str, str]]:
    """The model in MODEL_FILE, or the one served at --server; with how errors name it and the
    dataset it records it was trained on ("" if it does not say)."""
    check_not_swapped(args)
    if (args.model is None) == (args.server is None):
        raise ValueError("give a MODEL_FILE or --server HOST:PORT (with --model-name), one of the two")
    if args.server is None:
        if args.model_name or args.version:
            raise ValueError("--model-name and --version apply to --server only; MODEL_FILE holds one model")
        checkpoint = read_checkpoint(args.model)
        yield checkpoint.model, f"the model in {args.model}", checkpoint.meta.dataset
        return
    if not args.model_name:
        raise ValueError("--server needs --model-name NAME: the served model to ask")
    with InferenceClient(args.server, connection=connection(args)) as client:
        served = ServedModel(client, args.model_name, args.version)
        yield served, f"model {args.model_name!r} at {args.server}", ""  # its metadata names no dataset


def check_not_swapped(args: argparse.Namespace) -> None:
    """Refuse a model file given as --server's HOST:PORT, or a HOST:PORT given as MODEL_FILE,
    naming the command that was probably meant."""
    samples = ["--npy", args.npy] if args.npy else ["--dataset", args.dataset] if args.dataset else []
    server, model_file = args.server, args.model
    if model_file is None and server is not None and looks_like_a_model_file(server):
        meant = shlex.join(["tandem", "predict", server, *samples])
        raise ValueError(
            f"--server takes the HOST:PORT of an inference service, and {server} is a file; "
            f"to predict with a model file in this process: {meant}"
        )
    if server is None and model_file is not None and looks_like_an_address(model_file):
        model_name = ["--model-name", args.model_name or "NAME"]
        meant = shlex.join(["tandem", "predict", "--server", model_file, *model_name, *samples])
        raise ValueError(
            f"MODEL_FILE is a saved model's path, and {model_file} looks like the HOST:PORT of an "
            f"inference service; to ask the service there: {meant}"
        )


def looks_like_a_model_file(text: str) -> bool:
    return Path(text).is_file() or text.endswith(".safetensors")


def looks_like_an_address(text: str) -> bool:
    return ADDRESS.fullmatch(text) is not None and not Path(text).exists()


def predict_samples(
    args: argparse.Namespace, model: Model | ServedModel, model_text: str, trained_on: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The samples to predict (the first --limit) and, from a dataset's test split, their labels."""
    if args.npy is None:
        name = model_dataset(args.dataset, trained_on)
        dataset = load_dataset_for(model, name, args.data_dir, model_text)
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
    if array.dtype not in (np.float32, np.float64):  # integer pixels would be taken as 0..255, unscaled
        raise ValueError(
            f"{path}: samples must be float32 or float64, scaled as the model's training data "
            f"(pixels 0..1); found {array.dtype}"
        )
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
