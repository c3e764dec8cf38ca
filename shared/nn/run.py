"""A training run: architecture + dataset + hyperparameters -> trained model and history.

This is the one entry point the CLI, the trainer service and the
benchmarks share, so a job trained anywhere is trained the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np

from shared.data import Dataset
from shared.dtypes import MODEL_DTYPES
from shared.nn import EarlyStopping, History, Model, build_model, fit, make_optimizer
from shared.nn.augment import Augmentation
from shared.nn.optim import LR_SCHEDULES, OPTIMIZERS, Optimizer
from shared.nn.presets import get_preset

MAX_LEARNING_RATE = 100.0  # far above any rate that trains; beyond it every run diverges


@dataclass(frozen=True)
class Hyperparameters:
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": anneal to 0 over the run
    # Linear warm-up to learning_rate over this many epochs (rounded to whole steps), then the
    # schedule over the rest. In epochs, not steps, as a CLI user thinks of a run; below epochs.
    warmup_epochs: float = 0.0
    momentum: float = 0.9  # for "momentum" and "nesterov"
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 10
    seed: int = 0  # initial weights and shuffling
    dtype: str = "float32"
    validation_split: float = 0.0
    early_stopping_patience: int = 0  # 0 = off; else stop after this many epochs without gain
    early_stopping_monitor: str = "val_loss"
    augment_shift: int = 0  # training images shifted by up to this many pixels; 0 = off
    augment_flip: bool = False  # and mirrored left-right at random (off: digits must not be)

    def __post_init__(self):
        """Check every setting, naming the field that is wrong."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        # Comparisons are false for NaN, so each range check refuses NaN too; inf needs its own.
        if not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ValueError(
                f"learning_rate must be > 0 and at most {MAX_LEARNING_RATE}, got {self.learning_rate}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs must be >= 0 and below epochs ({self.epochs}), got {self.warmup_epochs}"
            )
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.dtype not in MODEL_DTYPES:  # the names themselves: they go into checkpoints as given
            raise ValueError(f"dtype must be {' or '.join(map(repr, MODEL_DTYPES))}, got {self.dtype!r}")
        if not 0 <= self.validation_split < 1:
            raise ValueError(f"validation_split must be in [0, 1), got {self.validation_split}")
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if self.early_stopping_patience and not self.validation_split:
            raise ValueError("early_stopping_patience needs validation_split > 0")
        self.early_stopping()  # checks the monitor
        self.augmentation()  # checks the settings; check_fits checks them against the images

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> Hyperparameters:
        """The preset's tuned settings, with `overrides` (None values ignored) on top."""
        settings = {**get_preset(preset).training, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**settings)

    @classmethod
    def from_dict(cls, data: dict) -> Hyperparameters:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown hyperparameters {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def as_dict(self) -> dict:
        return asdict(self)

    def early_stopping(self) -> EarlyStopping | None:
        if not self.early_stopping_patience:
            return None
        return EarlyStopping(monitor=self.early_stopping_monitor, patience=self.early_stopping_patience)

    def augmentation(self) -> Augmentation:
        return Augmentation(shift=self.augment_shift, flip=self.augment_flip)


@dataclass
class TrainedModel:
    model: Model
    history: History


def prepare_model(
    spec: dict, dataset: Dataset, hp: Hyperparameters, initial_weights: dict[str, np.ndarray] | None = None
) -> Model:
    """Build `spec` for `dataset`, initialised from `hp.seed` or from `initial_weights`."""
    model = build_model(spec, dtype=hp.dtype)
    check_fits(model, dataset, hp)
    if initial_weights is None:
        return model.initialise(hp.seed)
    return model.load_state_dict(initial_weights)


def check_fits(model: Model, dataset: Dataset, hp: Hyperparameters) -> None:
    """Refuse (ValueError) a built model whose input or classes do not fit `dataset`, or
    augmentation settings its samples cannot take; allocates nothing."""
    if tuple(dataset.input_shape) != model.input_shape:
        raise ValueError(
            f"the spec's input_shape {list(model.input_shape)} does not fit dataset "
            f"{dataset.name!r}, whose samples have shape {list(dataset.input_shape)}"
        )
    if dataset.num_classes > model.num_classes:
        raise ValueError(
            f"the spec outputs {model.num_classes} classes, dataset {dataset.name!r} has "
            f"{dataset.num_classes}"
        )
    hp.augmentation().check(tuple(dataset.input_shape))


def prepare_optimizer(
    model: Model, hp: Hyperparameters, initial_state: dict[str, np.ndarray] | None = None
) -> Optimizer:
    """`hp`'s optimiser for `model`, fresh or from `initial_state` (an Optimizer.state_dict).

    A state that does not fit the optimiser and the model is a ValueError.
    """
    optimizer = make_optimizer(
        hp.optimizer,
        hp.learning_rate,
        momentum=hp.momentum,
        weight_decay=hp.weight_decay,
        decayed=model.decayed_parameters(),
    )
    if initial_state is not None:
        optimizer.load_state_dict(initial_state, model.state_dict())
    return optimizer


def fit_model(
    model: Model,
    dataset: Dataset,
    hp: Hyperparameters,
    callback: Callable | None = None,
    *,
    start_step: int = 0,
    optimizer: Optimizer | None = None,
) -> History:
    """Train a prepared model in place with `hp` (resuming after `start_step` steps).

    `optimizer` (from `prepare_optimizer`, default a fresh one) is updated in
    place: a callback that holds it sees its state after each step, as it
    sees the model's weights, and a resumed run passes the state saved with
    the checkpoint it resumes from.
    """
    if optimizer is None:
        optimizer = prepare_optimizer(model, hp)
    dtype = np.dtype(hp.dtype)
    return fit(
        model,
        optimizer,
        dataset.x_train.astype(dtype, copy=False),
        dataset.y_train,
        x_test=dataset.x_test.astype(dtype, copy=False),
        y_test=dataset.y_test,
        epochs=hp.epochs,
        batch_size=hp.batch_size,
        seed=hp.seed,
        validation_split=hp.validation_split,
        early_stopping=hp.early_stopping(),
        callback=callback,
        start_step=start_step,
        lr_schedule=hp.lr_schedule,
        warmup_epochs=hp.warmup_epochs,
        augmentation=hp.augmentation(),
    )


def train(
    spec: dict, dataset: Dataset, hp: Hyperparameters, callback: Callable | None = None
) -> TrainedModel:
    """Build, initialise and train `spec` on `dataset`: the whole run in one call."""
    model = prepare_model(spec, dataset, hp)
    return TrainedModel(model, fit_model(model, dataset, hp, callback))
