"""The flags several `tandem` commands take, and what they turn into.

--data-dir; the architecture (--preset, --spec and its file, --hidden); the
hyperparameters; TLS and the bearer token of a command that calls a service
(and the Connection they make); the argument types they parse with.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from shared.client import Connection, read_token_file, token_from_env
from shared.env import env
from shared.nn import OPTIMIZERS
from shared.nn.fit import MONITORS
from shared.nn.optim import LR_SCHEDULES
from shared.nn.run import Hyperparameters
from shared.security.tls import ClientTLS


def on_off(text: str) -> bool:
    """A switch's value, `on` or `off` (or true/false, yes/no, 1/0): a flag that can turn a
    preset's setting either way."""
    words = dict.fromkeys(("on", "true", "yes", "1"), True) | dict.fromkeys(
        ("off", "false", "no", "0"), False
    )
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return words[text.lower()]


# (flag, Hyperparameters field, type, help). A flag left out is None, which
# keeps the preset's tuned setting, or else the Hyperparameters default.
HYPERPARAMETER_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--epochs", "epochs", int, "passes over the training data"),
    ("--batch-size", "batch_size", int, "samples per step"),
    ("--optimizer", "optimizer", str, f"one of: {', '.join(OPTIMIZERS)}"),
    ("--lr", "learning_rate", float, "learning rate"),
    ("--lr-schedule", "lr_schedule", str, f"one of: {', '.join(LR_SCHEDULES)}"),
    ("--warmup-epochs", "warmup_epochs", float, "epochs of linear lr warm-up before the schedule"),
    ("--momentum", "momentum", float, "momentum of the momentum and nesterov optimizers"),
    ("--weight-decay", "weight_decay", float, "weight decay, in [0, 1)"),
    ("--seed", "seed", int, "seed of the initial weights and of the shuffling"),
    ("--dtype", "dtype", str, "float32 or float64"),
    (
        "--validation-split",
        "validation_split",
        float,
        "fraction of the training data held out for val metrics",
    ),
    (
        "--early-stopping-patience",
        "early_stopping_patience",
        int,
        "stop after this many epochs without improvement (needs --validation-split)",
    ),
    ("--early-stopping-monitor", "early_stopping_monitor", str, f"one of: {', '.join(MONITORS)}"),
    ("--augment-shift", "augment_shift", int, "shift training images by up to N pixels at random"),
    ("--augment-flip", "augment_flip", on_off, "mirror training images left-right at random"),
]
METAVARS = {int: "N", float: "X", str: "NAME", on_off: "on|off"}


def data_dir_flag() -> argparse.ArgumentParser:
    """--data-dir, for the commands that read datasets (a parent parser)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where to look for datasets (default: $TANDEM_DATA_DIR, else /usr/share/datasets)",
    )
    return flags


def add_architecture_flags(parser: argparse.ArgumentParser) -> None:
    architecture = parser.add_mutually_exclusive_group(required=True)
    architecture.add_argument("--preset", metavar="NAME", help="a named architecture (see `tandem presets`)")
    architecture.add_argument("--spec", metavar="FILE.json", help="a model spec (see shared/nn/spec.py)")
    parser.add_argument(
        "--hidden", type=widths, metavar="W1,W2,...", help="hidden layer widths, instead of the preset's"
    )


def read_spec_file(path: str) -> dict:
    """The model spec in the --spec file."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None


def add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    settings = parser.add_argument_group(
        "hyperparameters",
        "Unset ones keep the preset's tuned settings (see `tandem presets`), else the defaults below.",
    )
    for flag, field, type_, help_ in HYPERPARAMETER_FLAGS:
        settings.add_argument(
            flag,
            dest=field,
            type=type_,
            metavar=METAVARS[type_],
            help=f"{help_} (default: {getattr(Hyperparameters, field)})",
        )


def given_hyperparameters(args: argparse.Namespace) -> dict:
    """The hyperparameter flags by field name; None for those not given."""
    return {field: getattr(args, field) for _, field, _, _ in HYPERPARAMETER_FLAGS}


def connection_flags() -> argparse.ArgumentParser:
    """TLS and the bearer token, for the commands that call a service (a parent parser)."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group(
        "TLS and token",
        "For a service that serves TLS or asks for a token. A token is never "
        "taken as an argument (`ps` would show it): from --token-file, or "
        "$TANDEM_TOKEN_FILE or $TANDEM_TOKEN.",
    )
    group.add_argument(
        "--tls-ca",
        metavar="CA.pem",
        default=os.environ.get("TANDEM_TLS_CA"),
        help="speak TLS, trusting this CA (default: $TANDEM_TLS_CA)",
    )
    group.add_argument(
        "--tls-cert",
        metavar="CERT.pem",
        default=os.environ.get("TANDEM_TLS_CLIENT_CERT"),
        help="for mutual TLS: this client's certificate (default: $TANDEM_TLS_CLIENT_CERT)",
    )
    group.add_argument(
        "--tls-key",
        metavar="KEY.pem",
        default=os.environ.get("TANDEM_TLS_CLIENT_KEY"),
        help="the key of --tls-cert (default: $TANDEM_TLS_CLIENT_KEY)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS trusting the system's CAs (default: $TANDEM_TLS; implied by the flags above)",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="send the bearer token in FILE with every call "
        "(default: $TANDEM_TOKEN_FILE, else $TANDEM_TOKEN)",
    )
    return flags


def connection(args: argparse.Namespace) -> Connection:
    """TLS and token as the connection flags (and, by default, the environment) set them."""
    given = (args.tls_ca, args.tls_cert, args.tls_key)
    tls = ClientTLS(*given) if any(given) or args.tls or env("TANDEM_TLS", False, bool) else None
    token = read_token_file(args.token_file) if args.token_file else token_from_env()
    return Connection(tls, token)


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
