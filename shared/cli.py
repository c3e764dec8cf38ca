"""`tandem`: train models, evaluate them and query them from the command line.

    tandem train --preset digits-cnn --epochs 5
    tandem train --spec my_model.json --dataset fashion-mnist --data-dir ~/data
    tandem evaluate runs/digits-cnn.safetensors --dataset digits
    tandem predict runs/digits-cnn.safetensors --dataset digits --limit 5
    tandem predict runs/digits-cnn.safetensors --npy samples.npy
    tandem datasets
    tandem presets

predict through an inference service (`--server HOST:PORT`; without a
value, $TANDEM_INFERENCE, else 127.0.0.1:50052):

    tandem predict --server 127.0.0.1:50052 --model-name digits --dataset digits --limit 200
    tandem predict --server --model-name digits --npy samples.npy --version 3 --top-k 2

and train on a trainer service (`--trainer HOST:PORT`, default
$TANDEM_TRAINER, else 127.0.0.1:50051):

    tandem jobs start --model-name digits --preset digits-cnn --dataset digits --follow
    tandem jobs list --state running
    tandem jobs watch JOB_ID
    tandem jobs cancel JOB_ID
    tandem jobs checkpoints digits
    tandem jobs plot JOB_ID --out digits.png

Both take TLS and a bearer token for a service that asks for them
(`--tls-ca`, `--tls-cert`, `--tls-key`, `--tls`, `--token-file`; by default
$TANDEM_TLS_CA, $TANDEM_TLS_CLIENT_CERT, $TANDEM_TLS_CLIENT_KEY, $TANDEM_TLS,
and $TANDEM_TOKEN_FILE or $TANDEM_TOKEN). A token is never taken as an
argument, where `ps` would show it to every user of the machine.

Bad input (an unknown preset or dataset, a spec that cannot work, a bad
setting, a missing or corrupt file) is reported as `tandem: error: ...` on
stderr with exit code 2, like a usage error, and without a traceback; so is
a call a service refuses, as `tandem: error: STATUS: message`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timezone
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from shared.checkpoints.checkpoint import (Checkpoint, CheckpointError, CheckpointMeta, check_model_name,
                               load, save)
from shared.client import Connection, InferenceClient, TrainerClient, read_token_file, token_from_env
from shared.env import env
from shared.data import Dataset, list_datasets, load_dataset
from shared.nn import (OPTIMIZERS, EpochEvent, Model, SpecError, StepEvent, as_batch, build_model,
                       evaluate)
from shared.nn import top_k as rank
from shared.nn.presets import PRESETS, get_preset
from shared.nn.optim import LR_SCHEDULES
from shared.nn.fit import MONITORS
from shared.progress import Progress
from shared.rpc.convert import JOB_STATE_NAMES, job_state_name
from shared.rpc.stubs import tandem_common_pb2
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from shared.security.tls import ClientTLS
from shared.nn.run import Hyperparameters, train

EXIT_ERROR = 2             # the exit code argparse uses for usage errors
EXIT_JOB_UNSUCCESSFUL = 1  # a job watched to its end FAILED or was CANCELLED
EXIT_INTERRUPTED = 130     # the shell's code for a process stopped by Ctrl-C
DEFAULT_TRAINER = "127.0.0.1:50051"  # where `python -m trainer_svc` listens by default
DEFAULT_INFERENCE = "127.0.0.1:50052"  # where `python -m infer_svc` listens by default
SERVER_PREDICT_ROWS = 1024  # rows per Predict call (a server takes at most INFER_MAX_ROWS, 4096)

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
        exit_code = args.run(args)  # None for success, as for most commands
    except BrokenPipeError:  # the reader went away, as in `tandem predict ... | head`
        # Point stdout at /dev/null, or Python fails again flushing it at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    # SpecError, CheckpointError and DatasetError are ValueErrors; DatasetNotFound is a LookupError.
    except (ValueError, LookupError, OSError) as error:
        return report(describe(error))
    except grpc.RpcError as error:  # from `jobs ...` (--trainer) or `predict --server`
        exit_code = report(f"{error.code().name}: {error.details()}")
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            print(unavailable_hint(args), file=sys.stderr)
        return exit_code
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return exit_code or 0


def report(message: str) -> int:
    """Print `tandem: error: message` on stderr; return the exit code for it."""
    print(f"tandem: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def unavailable_hint(args: argparse.Namespace) -> str:
    """What to try when the service a command called is UNAVAILABLE."""
    tls = ("If it serves TLS, trust its CA with --tls-ca (and, for mutual TLS, give "
           "--tls-cert and --tls-key); a TLS handshake that fails looks like this too.")
    if getattr(args, "server", None):
        return (f"tandem: is an inference service at {args.server}, with a version of "
                f"{args.model_name!r} loaded? Start one with `python -m infer_svc`, or name "
                f"another with --server HOST:PORT. {tls}")
    return (f"tandem: no trainer answers at {args.trainer}? Start one with "
            f"`python -m trainer_svc`, or name another with --trainer HOST:PORT. {tls}")


def connection(args: argparse.Namespace) -> Connection:
    """TLS and token as the connection flags (and, by default, the environment) set them."""
    given = (args.tls_ca, args.tls_cert, args.tls_key)
    tls = (ClientTLS(*given) if any(given) or args.tls or env("TANDEM_TLS", False, bool)
           else None)
    token = read_token_file(args.token_file) if args.token_file else token_from_env()
    return Connection(tls, token)


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
    add_architecture_flags(train_parser)
    train_parser.add_argument("--dataset", default="digits", metavar="NAME", help="default: digits")
    train_parser.add_argument(
        "--name", help="the model's name (default: the preset's name or the spec file's stem)")
    train_parser.add_argument(
        "--out", metavar="PATH", help="checkpoint to write (default: runs/<name>.safetensors)")
    add_hyperparameter_flags(train_parser)
    train_parser.set_defaults(run=run_train)

    evaluate_parser = commands.add_parser(
        "evaluate", parents=[data_dir],
        help="a saved model's loss and accuracy on a dataset's test split")
    evaluate_parser.add_argument("model", metavar="MODEL_FILE")
    evaluate_parser.add_argument("--dataset", required=True, metavar="NAME")
    evaluate_parser.set_defaults(run=run_evaluate)

    predict_parser = commands.add_parser(
        "predict", parents=[data_dir, connection_flags()],
        help="predictions for some samples, from a saved model or an inference service",
        description="Predict with the model in MODEL_FILE, in this process, or with a model an "
                    "inference service serves (--server); give one of the two.")
    predict_parser.add_argument("model", metavar="MODEL_FILE", nargs="?",
                                help="a saved model (tandem train's output)")
    server = predict_parser.add_argument_group("through an inference service")
    default_server = os.environ.get("TANDEM_INFERENCE", DEFAULT_INFERENCE)
    server.add_argument(
        "--server", metavar="HOST:PORT", nargs="?", const=default_server,
        help=f"ask the inference service at HOST:PORT (without a value: $TANDEM_INFERENCE, "
             f"else {DEFAULT_INFERENCE})")
    server.add_argument("--model-name", metavar="NAME", help="the served model to ask (needed)")
    server.add_argument("--version", type=positive_int, metavar="V",
                        help="a version still in the store (default: the one the service serves)")
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

    add_jobs_commands(commands)
    return parser


def add_jobs_commands(commands: argparse._SubParsersAction) -> None:
    """`tandem jobs ...`: training jobs on a trainer service."""
    jobs = commands.add_parser(
        "jobs", help="train on a trainer service: start, follow, list and cancel jobs"
    ).add_subparsers(title="jobs commands", required=True, metavar="COMMAND")
    trainer = argparse.ArgumentParser(add_help=False, parents=[connection_flags()])
    trainer.add_argument(
        "--trainer", metavar="HOST:PORT", default=os.environ.get("TANDEM_TRAINER", DEFAULT_TRAINER),
        help=f"the trainer's address (default: $TANDEM_TRAINER, else {DEFAULT_TRAINER})")

    start_parser = jobs.add_parser("start", parents=[trainer], help="queue a training job")
    start_parser.add_argument("--model-name", required=True, metavar="NAME",
                              help="the name its checkpoints are published under")
    add_architecture_flags(start_parser)
    start_parser.add_argument("--dataset", required=True, metavar="NAME",
                              help="a dataset the trainer has (see its ListDatasets)")
    add_hyperparameter_flags(start_parser)
    schedule = start_parser.add_argument_group(
        "checkpoints", "The final checkpoint is always published; these add intermediate ones.")
    schedule.add_argument("--every-steps", type=int, default=0, metavar="N",
                          help="publish every N optimiser steps (default: 0, not by steps)")
    schedule.add_argument("--no-every-epoch", dest="every_epoch", action="store_false",
                          help="do not publish at the end of every epoch")
    start_parser.add_argument("--resume-from-version", type=positive_int, metavar="V",
                              help="start from this published version of the model")
    start_parser.add_argument("--follow", action="store_true",
                              help="then watch it to its end, as `tandem jobs watch`")
    start_parser.set_defaults(run=run_jobs_start)

    list_parser = jobs.add_parser("list", parents=[trainer], help="list the jobs, newest first")
    list_parser.add_argument("--state", action="append", default=[], type=str.upper,
                             choices=JOB_STATE_NAMES, metavar="STATE",
                             help="only jobs in this state (repeatable): "
                                  + ", ".join(JOB_STATE_NAMES))
    list_parser.add_argument("--model-name", default="", metavar="NAME",
                             help="only jobs publishing to this model")
    list_parser.set_defaults(run=run_jobs_list)

    watch_parser = jobs.add_parser(
        "watch", parents=[trainer],
        help="follow a job to its end (exit code 0 if it SUCCEEDED, 1 if not)")
    watch_parser.add_argument("job_id", metavar="JOB_ID")
    watch_parser.set_defaults(run=run_jobs_watch)

    cancel_parser = jobs.add_parser("cancel", parents=[trainer], help="stop a job")
    cancel_parser.add_argument("job_id", metavar="JOB_ID")
    cancel_parser.set_defaults(run=run_jobs_cancel)

    checkpoints_parser = jobs.add_parser(
        "checkpoints", parents=[trainer], help="list a model's published versions")
    checkpoints_parser.add_argument("model_name", metavar="MODEL_NAME")
    checkpoints_parser.set_defaults(run=run_jobs_checkpoints)

    plot_parser = jobs.add_parser(
        "plot", parents=[trainer],
        help="plot a job's loss and accuracy per epoch (needs matplotlib: tandem[plot])")
    plot_parser.add_argument("job_id", metavar="JOB_ID")
    plot_parser.add_argument("--out", required=True, metavar="FILE.png", help="the image to write")
    plot_parser.set_defaults(run=run_jobs_plot)


def connection_flags() -> argparse.ArgumentParser:
    """TLS and the bearer token, for the commands that call a service."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group(
        "TLS and token", "For a service that serves TLS or asks for a token. A token is never "
                         "taken as an argument (`ps` would show it): from --token-file, or "
                         "$TANDEM_TOKEN_FILE or $TANDEM_TOKEN.")
    group.add_argument("--tls-ca", metavar="CA.pem", default=os.environ.get("TANDEM_TLS_CA"),
                       help="speak TLS, trusting this CA (default: $TANDEM_TLS_CA)")
    group.add_argument("--tls-cert", metavar="CERT.pem",
                       default=os.environ.get("TANDEM_TLS_CLIENT_CERT"),
                       help="for mutual TLS: this client's certificate "
                            "(default: $TANDEM_TLS_CLIENT_CERT)")
    group.add_argument("--tls-key", metavar="KEY.pem",
                       default=os.environ.get("TANDEM_TLS_CLIENT_KEY"),
                       help="the key of --tls-cert (default: $TANDEM_TLS_CLIENT_KEY)")
    group.add_argument("--tls", action="store_true",
                       help="speak TLS trusting the system's CAs (default: $TANDEM_TLS; "
                            "implied by the flags above)")
    group.add_argument("--token-file", metavar="FILE",
                       help="send the bearer token in FILE with every call "
                            "(default: $TANDEM_TOKEN_FILE, else $TANDEM_TOKEN)")
    return flags


def add_architecture_flags(parser: argparse.ArgumentParser) -> None:
    architecture = parser.add_mutually_exclusive_group(required=True)
    architecture.add_argument(
        "--preset", metavar="NAME", help="a named architecture (see `tandem presets`)")
    architecture.add_argument(
        "--spec", metavar="FILE.json", help="a model spec (see shared/nn/spec.py)")
    parser.add_argument("--hidden", type=widths, metavar="W1,W2,...",
                        help="hidden layer widths, instead of the preset's")


def add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    settings = parser.add_argument_group(
        "hyperparameters",
        "Unset ones keep the preset's tuned settings (see `tandem presets`), "
        "else the defaults below.")
    for flag, field, type_, help_ in HYPERPARAMETER_FLAGS:
        settings.add_argument(flag, dest=field, type=type_, metavar=METAVARS[type_],
                              help=f"{help_} (default: {getattr(Hyperparameters, field)})")


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


def given_hyperparameters(args: argparse.Namespace) -> dict:
    """The hyperparameter flags by field name; None for those not given."""
    return {field: getattr(args, field) for _, field, _, _ in HYPERPARAMETER_FLAGS}


def hyperparameters(args: argparse.Namespace) -> Hyperparameters:
    given = given_hyperparameters(args)
    if args.preset:
        return Hyperparameters.for_preset(args.preset, **given)
    return Hyperparameters(**{field: value for field, value in given.items() if value is not None})


def model_spec(args: argparse.Namespace, dataset: Dataset) -> dict:
    """The preset's spec for the dataset's shape and classes, or the spec file's contents."""
    if args.preset:
        return get_preset(args.preset).spec(dataset.input_shape, dataset.num_classes, args.hidden)
    if args.hidden:
        raise ValueError("--hidden applies to --preset only; a spec file sets its own layer widths")
    spec = read_spec_file(args.spec)
    try:
        build_model(spec)  # train() builds it too; checked here to name the file in the error
    except SpecError as error:
        raise SpecError(f"{args.spec}: {error}") from None
    return spec


def read_spec_file(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None


def run_evaluate(args: argparse.Namespace) -> None:
    checkpoint = read_checkpoint(args.model)
    dataset = load_dataset_for(checkpoint.model, args.dataset, args.data_dir,
                               f"the model in {args.model}")
    meta = checkpoint.meta
    print(f"model {meta.model_name}: epoch {meta.epoch}, step {meta.step}, "
          f"trained on {meta.dataset or 'an unnamed dataset'}")
    loss, correct = score_test_split(checkpoint.model, dataset)
    print(f"{dataset.name} test split, {len(dataset.y_test)} samples")
    print(f"test loss {loss:.4f}  accuracy {accuracy_text(correct, len(dataset.y_test))}")


def run_predict(args: argparse.Namespace) -> None:
    """Predict with a model file or through a service: only where probabilities come from differs."""
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
        raise ValueError("give a MODEL_FILE or --server HOST:PORT (with --model-name), "
                         "one of the two")
    if args.server is None:
        if args.model_name or args.version:
            raise ValueError("--model-name and --version apply to --server only; "
                             "MODEL_FILE holds one model")
        yield read_checkpoint(args.model).model, f"the model in {args.model}"
        return
    if not args.model_name:
        raise ValueError("--server needs --model-name NAME: the served model to ask")
    with InferenceClient(args.server, connection=connection(args)) as client:
        yield (ServedModel(client, args.model_name, args.version),
               f"model {args.model_name!r} at {args.server}")


class ServedModel:
    """A model an inference service serves, with the Model attributes predict needs:
    input_shape, num_classes and dtype (from its metadata) and predict_proba (by Predict calls)."""

    def __init__(self, client: InferenceClient, name: str, version: int | None):
        self.client, self.name = client, name
        metadata = client.model_metadata(name, version)
        self.version = metadata.version
        self.input_shape = tuple(metadata.input_shape)
        self.num_classes = metadata.num_classes
        self.dtype = np.dtype(metadata.dtype)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities from the version the metadata described, in calls of at most
        SERVER_PREDICT_ROWS rows, so a reload midway never mixes versions.

        Like Model.predict_proba, it takes samples of any real dtype: they are
        cast to the model's here, as the model would at its door.
        """
        x = x.astype(self.dtype, copy=False)
        parts = [self.client.predict(self.name, x[start:start + SERVER_PREDICT_ROWS],
                                     version=self.version).probabilities
                 for start in range(0, len(x), SERVER_PREDICT_ROWS)]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_classes), np.float32)


def predict_samples(args: argparse.Namespace, model, model_text: str,
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """The samples to predict (the first --limit) and, from a dataset's test split, their labels."""
    if args.dataset:
        dataset = load_dataset_for(model, args.dataset, args.data_dir, model_text)
        return dataset.x_test[:args.limit], dataset.y_test[:args.limit]
    return read_samples(args.npy, model.input_shape)[:args.limit], None


def print_predictions(probabilities: np.ndarray, labels: np.ndarray | None, top_k: int) -> None:
    """A line per sample with its top_k classes; with labels, whether it is right, and the accuracy."""
    top, _ = rank(probabilities, top_k)
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


# ---------------------------------------------------------------- the jobs commands


def run_jobs_start(args: argparse.Namespace) -> int | None:
    with TrainerClient(args.trainer, connection=connection(args)) as trainer:
        job = trainer.start_job(
            args.model_name, args.dataset, preset=args.preset,
            spec=read_spec_file(args.spec) if args.spec else None, hidden=args.hidden or (),
            hyperparameters=given_hyperparameters(args), every_steps=args.every_steps,
            every_epoch=args.every_epoch, resume_from_version=args.resume_from_version)
        print(f"started job {job.job_id} ({job_state_name(job.state)})")
        if args.follow:
            return watch_exit_code(watch_job(trainer, job.job_id))
    return None


def run_jobs_list(args: argparse.Namespace) -> None:
    with TrainerClient(args.trainer, connection=connection(args)) as trainer:
        jobs = trainer.list_jobs(states=args.state, model_name=args.model_name)
    if not jobs:
        print("no jobs")
        return
    print_table(["JOB", "STATE", "MODEL", "DATASET", "EPOCH", "TEST ACC", "VERSION", "CREATED"], [
        [job.job_id, job_state_name(job.state), job.model_name, job.request.dataset,
         f"{job.progress.epoch}/{job.progress.epochs}",
         f"{job.last_metrics.test_accuracy:.2%}" if job.HasField("last_metrics") else "-",
         job.last_published_version or "-", local_time(job.created_at)]
        for job in jobs])


def run_jobs_watch(args: argparse.Namespace) -> int:
    with TrainerClient(args.trainer, connection=connection(args)) as trainer:
        return watch_exit_code(watch_job(trainer, args.job_id))


def run_jobs_cancel(args: argparse.Namespace) -> None:
    with TrainerClient(args.trainer, connection=connection(args)) as trainer:
        job = trainer.cancel(args.job_id)
    print(f"job {job.job_id}: {job_state_name(job.state)}")


def run_jobs_checkpoints(args: argparse.Namespace) -> None:
    with TrainerClient(args.trainer, connection=connection(args)) as trainer:
        print_checkpoints(trainer.list_checkpoints(args.model_name))


def run_jobs_plot(args: argparse.Namespace) -> int | None:
    try:
        from matplotlib.figure import Figure  # an optional extra
    except ImportError:
        return report("`tandem jobs plot` needs matplotlib: pip install 'tandem[plot]'")
    with TrainerClient(args.trainer, connection=connection(args)) as trainer:
        job = trainer.get_job(args.job_id)
    if not job.history:
        raise ValueError(f"job {job.job_id} has no finished epoch to plot yet")
    history = [metrics_dict(epoch) for epoch in job.history]
    epochs = [metrics["epoch"] for metrics in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    figure.suptitle(f"job {job.job_id}: {job.model_name} on {job.request.dataset}")
    for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
        for split in ("train", "val", "test"):
            if f"{split}_{metric}" in history[0]:
                axes.plot(epochs, [m[f"{split}_{metric}"] for m in history], marker="o", label=split)
        axes.set(title=metric, xlabel="epoch")
        axes.legend()
    figure.savefig(args.out)
    print(f"wrote {args.out}")
    return None


def watch_job(trainer: TrainerClient, job_id: str,
              on_checkpoint: Callable[[pb.JobEvent], None] | None = None) -> pb.Job:
    """Show a job's progress until it ends; return it as it ended.

    What has happened so far first (its state, its finished epochs), then
    the progress bar and a line per epoch (Progress: on a terminal; plain
    lines elsewhere), a line per published checkpoint and per change of
    state, and the final state. `on_checkpoint` is called with each
    checkpoint event, after its line (the watch waits for it).
    """
    progress = None
    try:
        for event in trainer.watch(job_id):
            kind = event.WhichOneof("event")
            if progress is None:  # the first event: the job's snapshot
                job = event.snapshot
                print(f"job {job.job_id}: {job.model_name} on {job.request.dataset}, "
                      f"{job.progress.epochs} epochs: {job_state_name(job.state)}")
                progress = Progress(job.progress.epochs)
                for epoch in job.history:
                    progress(epoch_event(epoch))
            elif kind == "step":
                step = event.step
                progress(StepEvent(step.epoch, step.step, step.steps_per_epoch,
                                   step.batch_loss, step.batch_accuracy))
            elif kind == "epoch":
                progress(epoch_event(event.epoch))
            else:
                progress.close()  # clears the status line for the line below
                if kind == "snapshot":
                    print(f"job {job_id}: {job_state_name(event.snapshot.state)}")
                elif kind == "checkpoint":
                    print(f"published {checkpoint_text(event.checkpoint)}")
                    if on_checkpoint is not None:
                        on_checkpoint(event)
                else:
                    print(job_end_text(event.finished))
                    return event.finished
    finally:
        if progress is not None:
            progress.close()
    raise ConnectionError(f"the trainer ended the watch of job {job_id} before the job ended")


def watch_exit_code(job: pb.Job) -> int:
    return 0 if job.state == pb.JOB_STATE_SUCCEEDED else EXIT_JOB_UNSUCCESSFUL


def metrics_dict(epoch: pb.EpochMetrics) -> dict[str, float]:
    """An epoch's metrics by the training loop's names; val_* only when the job has them."""
    return {field.name: getattr(epoch, field.name) for field in epoch.DESCRIPTOR.fields
            if not field.has_presence or epoch.HasField(field.name)}


def epoch_event(epoch: pb.EpochMetrics) -> EpochEvent:
    return EpochEvent(epoch.epoch, epoch.step, metrics_dict(epoch))


def checkpoint_text(checkpoint: tandem_common_pb2.CheckpointInfo) -> str:
    """`digits version 3 (epoch 3, step 153, test accuracy 97.77%)`."""
    details = [f"epoch {checkpoint.epoch}", f"step {checkpoint.step}"]
    if "test_accuracy" in checkpoint.metrics:
        details.append(f"test accuracy {checkpoint.metrics['test_accuracy']:.2%}")
    return f"{checkpoint.model_name} version {checkpoint.version} ({', '.join(details)})"


def job_end_text(job: pb.Job) -> str:
    """`job 1f2e…: SUCCEEDED (completed), test accuracy 98.88% after epoch 15, latest version 15`."""
    text = f"job {job.job_id}: {job_state_name(job.state)}"
    if job.stop_reason:
        text += f" ({job.stop_reason})"
    if job.error:
        text += f": {job.error}"
    if job.HasField("last_metrics"):
        text += (f", test accuracy {job.last_metrics.test_accuracy:.2%} "
                 f"after epoch {job.last_metrics.epoch}")
    if job.last_published_version:
        text += f", latest version {job.last_published_version}"
    return text


def print_checkpoints(checkpoints: list[tandem_common_pb2.CheckpointInfo]) -> None:
    """A table of CheckpointInfo messages; the latest version is marked with `*`."""
    print_table(["VERSION", "EPOCH", "STEP", "TEST ACC", "SIZE", "CREATED"], [
        [f"{c.version}{' *' if c.latest else ''}", c.epoch, c.step,
         f"{c.metrics['test_accuracy']:.2%}" if "test_accuracy" in c.metrics else "-",
         f"{c.size_bytes / 1024:.1f} KiB", local_time(c.created_at)]
        for c in checkpoints])


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def local_time(stamp: Timestamp) -> str:
    """A protobuf Timestamp in the local time zone, to the second."""
    return stamp.ToDatetime(tzinfo=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- shared steps


def read_checkpoint(path: str) -> Checkpoint:
    try:
        return load(path)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


def load_dataset_for(model: Model | ServedModel, name: str, data_dir: str | None,
                     model_text: str) -> Dataset:
    """Load dataset `name` in the model's dtype; refuse it if its samples do not fit the model.

    `model_text` names the model in errors: "the model in PATH", "model 'digits' at HOST:PORT".
    """
    dataset = load_dataset(name, data_dir, dtype=model.dtype)
    if dataset.input_shape != model.input_shape:
        raise ValueError(
            f"dataset {name!r} has samples of shape {list(dataset.input_shape)}, "
            f"but {model_text} takes {list(model.input_shape)}")
    if dataset.num_classes > model.num_classes:
        raise ValueError(
            f"dataset {name!r} has {dataset.num_classes} classes, "
            f"but {model_text} tells only {model.num_classes} apart")
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
    try:
        return as_batch(array, input_shape)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def score_test_split(model: Model, dataset: Dataset) -> tuple[float, int]:
    """(mean loss, number of correct predictions) on the dataset's test split."""
    loss, accuracy = evaluate(model, dataset.x_test, dataset.y_test)
    return loss, round(accuracy * len(dataset.y_test))


def accuracy_text(correct: int, total: int) -> str:
    return f"{correct / total:.2%} ({correct}/{total})"


if __name__ == "__main__":
    sys.exit(main())
