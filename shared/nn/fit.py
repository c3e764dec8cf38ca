"""The training loop: epochs over shuffled minibatches, metrics, early stopping.

`fit` is deterministic for a given seed: the same seed, data and settings
give bit-identical weights. A callback sees every step and every epoch;
raising `StopTraining` from it ends training at that step boundary (the
trainer service cancels jobs this way). A loss that becomes NaN or infinite
(or weights that do, checked at each epoch's end) raises `TrainingDiverged`:
a run that diverged has nothing left to publish.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Concatenate, ParamSpec

import numpy as np

from shared.data.split import stratified_split
from shared.nn.augment import Augmentation
from shared.nn.losses import log_softmax
from shared.nn.model import Model
from shared.nn.optim import Optimizer, scheduled_lr, warmup_step_count

MONITORS = ("val_loss", "val_accuracy")
EVAL_BATCH = 1024  # samples per forward pass when evaluating


class StopTraining(Exception):
    """Raised by a callback to stop training at the current step boundary."""


class TrainingDiverged(ArithmeticError):
    """The loss (or the weights) became NaN or infinite: nothing after this step is worth keeping."""

    def __init__(self, step: int, what: str):
        super().__init__(f"diverged at step {step} ({what})")
        self.step = step


def check_finite_weights(model: Model, step: int) -> None:
    """Raise TrainingDiverged if any weight is NaN or infinite (a finite loss does not rule it out)."""
    bad = [name for name, array in model.state_dict().items() if not np.isfinite(array).all()]
    if bad:
        raise TrainingDiverged(step, f"non-finite weights in {', '.join(bad)}")


@dataclass(frozen=True)
class StepEvent:
    epoch: int  # 1-based
    step: int  # 1-based, counted over the whole run
    steps_per_epoch: int
    batch_loss: float
    batch_accuracy: float


@dataclass(frozen=True)
class EpochEvent:
    epoch: int
    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when `monitor` has not improved by `min_delta` for `patience` epochs."""

    monitor: str = "val_loss"
    patience: int = 3
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self):
        if self.monitor not in MONITORS:
            raise ValueError(f"early_stopping.monitor must be one of {MONITORS}, got {self.monitor!r}")
        if self.patience < 1:
            raise ValueError(f"early_stopping.patience must be >= 1, got {self.patience}")

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.monitor == "val_loss":
            return value < best - self.min_delta
        return value > best + self.min_delta


@dataclass
class History:
    """Every epoch's metrics, and how and where training ended."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str = "completed"  # completed | early_stopping | stopped
    best_epoch: int | None = None
    steps: int = 0
    weights_epoch: int | None = None  # the epoch whose weights the model ended with

    @property
    def weights_metrics(self) -> dict[str, float]:
        """Metrics of the weights the model holds (the best epoch's after early stopping)."""
        for metrics in self.epochs:
            if metrics["epoch"] == self.weights_epoch:
                return metrics
        return {}

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(model: Model, x: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the model on (x, y)."""
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set of samples")
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model.forward(x[start : start + batch_size])
        labels = y[start : start + batch_size]
        log_probs = log_softmax(logits)
        total_loss -= float(log_probs[np.arange(len(labels)), labels].sum())
        correct += int((logits.argmax(axis=1) == labels).sum())
    return total_loss / len(x), correct / len(x)


_Settings = ParamSpec("_Settings")
_Training = Callable[Concatenate[Model, Optimizer, _Settings], History]


def _restores_the_rate(train: _Training[_Settings]) -> _Training[_Settings]:
    """`train(model, optimizer, ...)` setting `optimizer.lr` back to its starting rate when it
    returns or raises: the schedule changes it at every step, and the rate a caller set is
    the base the schedule scales, not the last step's."""

    @functools.wraps(train)
    def training(
        model: Model, optimizer: Optimizer, *args: _Settings.args, **kwargs: _Settings.kwargs
    ) -> History:
        base_lr = optimizer.lr
        try:
            return train(model, optimizer, *args, **kwargs)
        finally:
            optimizer.lr = base_lr

    return training


@_restores_the_rate
def fit(
    model: Model,
    optimizer: Optimizer,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    validation_split: float = 0.0,
    early_stopping: EarlyStopping | None = None,
    callback: Callable[[StepEvent | EpochEvent], None] | None = None,
    start_step: int = 0,
    lr_schedule: str = "constant",
    warmup_epochs: float = 0.0,
    augmentation: Augmentation | None = None,
) -> History:
    """Train `model` in place and return its history.

    Metrics per epoch: train_loss/train_accuracy (running means over the
    epoch's minibatches, as Keras and PyTorch loops report them),
    val_* on the held-out `validation_split` of the training data,
    test_* on (x_test, y_test), and the epoch's wall time in seconds.
    `start_step` > 0 resumes a run after that many steps, with the same
    shuffling and learning-rate schedule (a resumed partial epoch reports
    train metrics over the batches it ran); given the optimiser's state at
    that step too (`Optimizer.load_state_dict`), it ends bit-identical to the
    unbroken run. The optimiser is updated in place, so a callback holding it
    sees its state after each step, as it sees the model's weights.
    `lr_schedule` ("constant" or "cosine") sets the optimiser's rate before
    every step from its starting rate, after a linear warm-up of
    `warmup_epochs` (rounded to whole steps; see `scheduled_lr`); when fit
    returns, or raises, the optimiser has its starting rate again.
    `augmentation` shifts (and flips) the images of each training batch,
    drawn from `seed` and the step's number (see shared.nn.augment).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    if early_stopping and not validation_split:
        raise ValueError("early stopping monitors validation data: set validation_split > 0")
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test go together: pass both or neither")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be >= 0 and below epochs ({epochs}), got {warmup_epochs}")
    augmentation = augmentation or Augmentation()
    augmentation.check(x_train.shape[1:])
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    if validation_split:
        train_idx, val_idx = stratified_split(y_train, validation_split, seed)
        x_train, y_train, x_val, y_val = (
            x_train[train_idx],
            y_train[train_idx],
            x_train[val_idx],
            y_train[val_idx],
        )
    n = len(x_train)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and the {n} training samples, got {batch_size}")

    steps_per_epoch = -(-n // batch_size)
    if not 0 <= start_step <= epochs * steps_per_epoch:
        raise ValueError(f"start_step must be in [0, {epochs * steps_per_epoch}], got {start_step}")
    history = History(steps=start_step)
    base_lr = optimizer.lr
    total_steps = epochs * steps_per_epoch
    warmup_steps = warmup_step_count(warmup_epochs, steps_per_epoch, total_steps)
    scheduled_lr(base_lr, lr_schedule, 0, total_steps, warmup_steps)  # refuses a bad schedule now
    best_value, best_weights, waited = None, None, 0
    first_epoch, steps_done = divmod(start_step, steps_per_epoch)
    for epoch in range(first_epoch + 1, epochs + 1):
        started = time.perf_counter()
        order = np.random.default_rng([seed, epoch]).permutation(n)
        skip = steps_done * batch_size if epoch == first_epoch + 1 else 0
        loss_sum = correct = seen = 0.0
        try:
            for start in range(skip, n, batch_size):
                batch = order[start : start + batch_size]
                optimizer.lr = scheduled_lr(base_lr, lr_schedule, history.steps, total_steps, warmup_steps)
                x_batch = augmentation.apply(x_train[batch], seed, history.steps)
                loss, logits = model.train_step_gradients(x_batch, y_train[batch])
                if not math.isfinite(loss):  # before the step: the weights stay as they were
                    raise TrainingDiverged(history.steps + 1, f"loss {loss}")
                optimizer.step(model.state_dict(), model.gradients())
                hits = int((logits.argmax(axis=1) == y_train[batch]).sum())
                loss_sum += loss * len(batch)
                correct += hits
                seen += len(batch)
                history.steps += 1
                if callback:
                    callback(StepEvent(epoch, history.steps, steps_per_epoch, loss, hits / len(batch)))
        except StopTraining:
            history.stop_reason = "stopped"
            return history

        check_finite_weights(model, history.steps)
        metrics = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen}
        if x_val is not None and y_val is not None:
            metrics["val_loss"], metrics["val_accuracy"] = evaluate(model, x_val, y_val)
        if x_test is not None and y_test is not None:
            metrics["test_loss"], metrics["test_accuracy"] = evaluate(model, x_test, y_test)
        metrics["seconds"] = time.perf_counter() - started
        history.epochs.append(metrics)
        history.weights_epoch = epoch
        try:
            if callback:
                callback(EpochEvent(epoch, history.steps, dict(metrics)))
        except StopTraining:
            history.stop_reason = "stopped"
            return history

        if early_stopping:
            value = metrics[early_stopping.monitor]
            if early_stopping.improved(value, best_value):
                best_value, waited, history.best_epoch = value, 0, epoch
                if early_stopping.restore_best:
                    best_weights = copy.deepcopy(model.state_dict())
            else:
                waited += 1
                if waited >= early_stopping.patience:
                    history.stop_reason = "early_stopping"
                    if best_weights is not None:
                        model.load_state_dict(best_weights)
                        history.weights_epoch = history.best_epoch
                    return history
    return history
