"""The commands that run in this process, on files: `tandem train`, `evaluate`, `datasets`, `presets`.

Each `add_*` function adds its command to the parser; the command is its `run_*`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from shared.checkpoints.checkpoint import CheckpointMeta, check_model_name, save
from shared.cli.errors import EXIT_INTERRUPTED
from shared.cli.flags import (
    add_architecture_flags,
    add_dataset_flag,
    add_hyperparameter_flags,
    add_model_dataset_flag,
    data_dir_flag,
    hyperparameters,
    in_flag_words,
    model_dataset,
    positive_int,
    read_dataset,
    read_spec_file,
)
from shared.cli.models import load_dataset_for, read_checkpoint
from shared.cli.output import accuracy_text
from shared.cli.progress import TerminalProgress
from shared.data import Dataset, list_datasets
from shared.nn import EpochEvent, Model, SpecError, StepEvent, build_model, evaluate
from shared.nn.presets import PRESETS, get_preset
from shared.nn.run import fit_model, prepare_model

# ---------------------------------------------------------------- tandem train


def add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", parents=[data_dir_flag()], help="train a model and save it")
    add_architecture_flags(parser)
    add_dataset_flag(parser, "the dataset to train on (see `tandem datasets`)")
    parser.add_argument(
        "--name", help="the model's name (default: the preset's name or the spec file's stem)"
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="checkpoint to write, refused if it exists unless --force (default: runs/<name>.safetensors, "
        "or the first free of runs/<name>-2.safetensors, -3, ...: a run never overwrites another's)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite the --out file if it exists")
    parser.add_argument(
        "--save-every",
        type=positive_int,
        metavar="N",
        help="also save the model every N epochs, so that an interrupted run keeps one "
        "(default: save once, at the end)",
    )
    add_hyperparameter_flags(parser)
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int | None:
    hp = hyperparameters(args)
    dataset = read_dataset(args.dataset, args.data_dir, hp.dtype)
    spec = model_spec(args, dataset)
    name = check_model_name(args.name or args.preset or Path(args.spec).stem)
    out = output_path(args.out, args.force, name)
    out.parent.mkdir(parents=True, exist_ok=True)  # before training, so a bad path fails fast
    model = prepare_model(spec, dataset, hp)

    def checkpoint_meta(epoch: int, step: int, metrics: dict) -> CheckpointMeta:
        return CheckpointMeta(
            model_name=name,
            spec=model.spec,
            dtype=hp.dtype,
            step=step,
            epoch=epoch,
            metrics=metrics,
            dataset=dataset.name,
            hyperparameters=hp.as_dict(),
        )

    def save_epoch(event: EpochEvent) -> None:
        save_atomically(out, model, checkpoint_meta(event.epoch, event.step, event.metrics))

    run = TrainingRun(hp.epochs, args.save_every, save_epoch)
    try:
        history = fit_model(model, dataset, hp, callback=run)
    except KeyboardInterrupt:  # Ctrl-C: said below, once the status line is cleared
        history = None
    except ValueError as error:  # a setting that does not fit the data (batch_size > samples)
        raise ValueError(in_flag_words(error)) from None
    finally:
        run.progress.close()
    if history is None:
        print(f"tandem: {run.interrupted_text(out)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    last = history.epochs[-1]
    # Scored afresh: early stopping may have restored an earlier epoch's weights.
    _, correct = score_test_split(model, dataset)
    summary = f"final test accuracy {accuracy_text(correct, len(dataset.y_test))}"
    if history.stop_reason == "early_stopping":  # the CLI never stops training otherwise
        summary += (
            f"  (early stopping after epoch {last['epoch']}; kept the weights of epoch {history.best_epoch})"
        )
    print(summary)
    final = checkpoint_meta(history.weights_epoch or 0, history.steps, history.weights_metrics)
    save_atomically(out, model, final)
    print(f"saved {out}")
    return None


class TrainingRun:
    """The callback of `tandem train`'s run: the progress display, a save every `save_every`
    epochs (None: none), and what an interrupted run has to say about both."""

    def __init__(self, epochs: int, save_every: int | None, save: Callable[[EpochEvent], None]):
        self.epochs, self.save_every, self.save = epochs, save_every, save
        self.progress = TerminalProgress(epochs)
        self.finished_epoch = 0
        self.saved_epoch = 0

    def __call__(self, event: StepEvent | EpochEvent) -> None:
        self.progress(event)
        if isinstance(event, EpochEvent):
            self.finished_epoch = event.epoch
            if self.save_every and event.epoch % self.save_every == 0:
                self.save(event)
                self.saved_epoch = event.epoch

    def interrupted_text(self, out: Path) -> str:
        """`interrupted in epoch 3 of 15; nothing saved (...)`, or where the last save is."""
        text = f"interrupted in epoch {self.finished_epoch + 1} of {self.epochs}; "
        if self.saved_epoch:
            return text + f"the model of epoch {self.saved_epoch} is in {out}"
        if self.save_every:
            return (
                text + f"nothing saved (the first save of --save-every was due after epoch {self.save_every})"
            )
        return text + "nothing saved (--save-every N saves the model every N epochs)"


def output_path(out: str | None, force: bool, name: str) -> Path:
    """--out (refused if it exists, unless --force), else the first free default name."""
    if out is not None:
        path = Path(out)
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; give --force to overwrite it, or another --out")
        return path
    candidates = (
        Path("runs") / (f"{name}.safetensors" if number == 1 else f"{name}-{number}.safetensors")
        for number in itertools.count(1)
    )
    return next(path for path in candidates if not path.exists())


def save_atomically(path: Path, model: Model, meta: CheckpointMeta) -> None:
    """Write the checkpoint beside `path`, then rename it into place: a crash or a Ctrl-C
    midway never leaves half a checkpoint at `path`, nor a reader a half-written one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save(partial, model, meta)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


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


# ---------------------------------------------------------------- tandem evaluate


def add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        parents=[data_dir_flag()],
        help="a saved model's loss and accuracy on a dataset's test split",
    )
    parser.add_argument("model", metavar="MODEL_FILE", help="a saved model (tandem train's output)")
    add_model_dataset_flag(parser, "the dataset whose test split to score")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    checkpoint = read_checkpoint(args.model)
    meta = checkpoint.meta
    name = model_dataset(args.dataset, meta.dataset)
    dataset = load_dataset_for(checkpoint.model, name, args.data_dir, f"the model in {args.model}")
    print(
        f"model {meta.model_name}: epoch {meta.epoch}, step {meta.step}, "
        f"trained on {meta.dataset or 'an unnamed dataset'}"
    )
    loss, correct = score_test_split(checkpoint.model, dataset)
    print(f"{dataset.name} test split, {len(dataset.y_test)} samples")
    print(f"test loss {loss:.4f}  accuracy {accuracy_text(correct, len(dataset.y_test))}")


def score_test_split(model: Model, dataset: Dataset) -> tuple[float, int]:
    """(mean loss, number of correct predictions) on the dataset's test split."""
    loss, accuracy = evaluate(model, dataset.x_test, dataset.y_test)
    return loss, round(accuracy * len(dataset.y_test))


# ---------------------------------------------------------------- tandem datasets, presets


def add_datasets(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("datasets", parents=[data_dir_flag()], help="list the datasets")
    parser.set_defaults(run=run_datasets)


def run_datasets(args: argparse.Namespace) -> None:
    for name in list_datasets(args.data_dir):
        print(name)


def add_presets(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("presets", help="list the preset architectures")
    parser.set_defaults(run=run_presets)


def run_presets(args: argparse.Namespace) -> None:
    width = max(map(len, PRESETS))
    for preset in PRESETS.values():
        hidden = ",".join(map(str, preset.default_hidden))
        training = ", ".join(f"{key} {value}" for key, value in preset.training.items())
        print(f"{preset.name:<{width}}  {preset.description}")
        print(f"{'':<{width}}  hidden {hidden}; {training}")
