"""The commands that run in this process, on files: `tandem train`, `evaluate`, `datasets`, `presets`.

Each `add_*` function adds its command to the parser; the command is its `run_*`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.checkpoints.checkpoint import CheckpointMeta, check_model_name, save
from shared.cli.flags import (
    add_architecture_flags,
    add_hyperparameter_flags,
    data_dir_flag,
    given_hyperparameters,
    read_spec_file,
)
from shared.cli.models import load_dataset_for, read_checkpoint
from shared.cli.output import accuracy_text
from shared.cli.progress import TerminalProgress
from shared.data import Dataset, list_datasets, load_dataset
from shared.nn import Model, SpecError, build_model, evaluate
from shared.nn.presets import PRESETS, get_preset
from shared.nn.run import Hyperparameters, train

# ---------------------------------------------------------------- tandem train


def add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", parents=[data_dir_flag()], help="train a model and save it")
    add_architecture_flags(parser)
    parser.add_argument("--dataset", default="digits", metavar="NAME", help="default: digits")
    parser.add_argument(
        "--name", help="the model's name (default: the preset's name or the spec file's stem)"
    )
    parser.add_argument(
        "--out", metavar="PATH", help="checkpoint to write (default: runs/<name>.safetensors)"
    )
    add_hyperparameter_flags(parser)
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    hp = hyperparameters(args)
    dataset = load_dataset(args.dataset, args.data_dir, dtype=hp.dtype)
    spec = model_spec(args, dataset)
    name = check_model_name(args.name or args.preset or Path(args.spec).stem)
    out = Path(args.out or f"runs/{name}.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)  # before training, so a bad path fails fast

    progress = TerminalProgress(hp.epochs)
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
        summary += (
            f"  (early stopping after epoch {last['epoch']}; kept the weights of epoch {history.best_epoch})"
        )
    print(summary)

    save(
        out,
        trained.model,
        CheckpointMeta(
            model_name=name,
            spec=trained.model.spec,
            dtype=hp.dtype,
            step=history.steps,
            epoch=history.weights_epoch or 0,
            metrics=history.weights_metrics,
            dataset=dataset.name,
            hyperparameters=hp.as_dict(),
        ),
    )
    print(f"saved {out}")


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


# ---------------------------------------------------------------- tandem evaluate


def add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        parents=[data_dir_flag()],
        help="a saved model's loss and accuracy on a dataset's test split",
    )
    parser.add_argument("model", metavar="MODEL_FILE")
    parser.add_argument("--dataset", required=True, metavar="NAME")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    checkpoint = read_checkpoint(args.model)
    dataset = load_dataset_for(checkpoint.model, args.dataset, args.data_dir, f"the model in {args.model}")
    meta = checkpoint.meta
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
