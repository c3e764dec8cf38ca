"""`tandem`: train models, evaluate them and query them from the command line.

    tandem train --preset digits-cnn --epochs 5
    tandem train --spec my_model.json --dataset fashion-mnist --data-dir ~/data
    tandem evaluate runs/digits-cnn.safetensors --dataset digits
    tandem predict runs/digits-cnn.safetensors --dataset digits --limit 5
    tandem predict runs/digits-cnn.safetensors --npy samples.npy
    tandem datasets
    tandem presets
    tandem export runs/digits-cnn.safetensors --onnx digits.onnx

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

The commands, by module:

    local.py     train, evaluate, datasets, presets: in this process, on files
    predict.py   predict, with a model file or a served model (models.py: the two kinds)
    jobs.py      jobs start, list, watch, cancel, checkpoints, plot: on a trainer service
    export.py    export: a checkpoint as an ONNX file (shared.export.onnx)
    flags.py     the flags several commands share (data, architecture, hyperparameters, TLS, token)
    output.py    tables, local times and one-line texts
    progress.py  the live training progress line (TerminalProgress)
    errors.py    errors as `tandem: error: ...`, and the exit codes

May import anything in shared except shared.embedded; never trainer_svc or infer_svc.
"""

from __future__ import annotations

import argparse

from shared.cli import export, jobs, local, predict
from shared.cli.errors import run_command


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0), or a usage error argparse has already reported (2)
        return int(exit_.code or 0)
    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", description="Train, evaluate and query Tandem's NumPy models."
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add_command in (
        local.add_train,
        local.add_evaluate,
        predict.add_predict,
        local.add_datasets,
        local.add_presets,
        jobs.add_jobs,
        export.add_export,
    ):
        add_command(commands)  # in this order in `tandem --help`
    return parser
