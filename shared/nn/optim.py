"""Optimisers: minibatch SGD (plain, momentum, Nesterov) and Adam.

`step(params, grads)` updates the named parameter arrays in place; the
gradient arrays are only read. Optional L2 weight decay adds
`weight_decay * W` to the gradient of weights, not of biases.
Learning rates and other settings are Python floats, so float32
parameters stay float32.

`state_dict()` / `load_state_dict()` carry what an optimiser has learnt
(momentum velocities; Adam's moments and step count) as plain arrays by
name, PyTorch's names: `PARAM.momentum_buffer`, `PARAM.exp_avg`,
`PARAM.exp_avg_sq` and `step`. A run resumed with the state saved at a
step goes on exactly as the unbroken run would have. Settings (learning
rate, betas, ...) are not state: they come from the hyperparameters.
"""

from __future__ import annotations

import math

import numpy as np


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def _in_range(name: str, value: float, low: float, high: float) -> float:
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value!r}")
    return float(value)


class Optimizer:
    slots: tuple[str, ...] = ()  # the arrays kept per parameter, by their state_dict suffix

    def __init__(self, lr: float, weight_decay: float = 0.0):
        self.lr = _positive("learning_rate", lr)
        self.weight_decay = _in_range("weight_decay", weight_decay, 0.0, 1.0)
        self.state: dict[str, dict[str, np.ndarray]] = {}  # parameter -> slot -> array
        self._work: np.ndarray | None = None  # see _scratch; not state

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state by name (the live arrays, not copies, like Model.parameters).

        `PARAM.SLOT` for each parameter's arrays (none before the first step),
        and the optimiser's counters (Adam's `step`, an int64 scalar).
        """
        arrays = {
            f"{name}.{slot}": array for name, slots in self.state.items() for slot, array in slots.items()
        }
        return {**arrays, **self._counters()}

    def load_state_dict(self, state: dict[str, np.ndarray], params: dict[str, np.ndarray]) -> Optimizer:
        """Take a `state_dict()` for the parameters `params` (copied, checked against them).

        Every parameter must have every slot, with its shape and dtype, or none
        may (an optimiser that has not stepped yet); counters must be there too.
        Anything else is refused with a ValueError that names the arrays, and
        this optimiser stays as it was.
        """
        counters = self._counters()
        slots = {f"{name}.{slot}": param for name, param in params.items() for slot in self.slots}
        stepped = not slots.keys().isdisjoint(state)
        expected = {**(slots if stepped else {}), **counters}
        unknown = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        if unknown or missing:
            raise ValueError(
                f"{type(self).__name__} state does not fit: missing {missing}, unknown {unknown}"
            )
        for name, like in expected.items():
            array = np.asarray(state[name])
            if array.shape != like.shape or array.dtype != like.dtype:
                raise ValueError(
                    f"{type(self).__name__} state does not fit: {name} is {array.dtype} "
                    f"{list(array.shape)}, needs {like.dtype} {list(like.shape)}"
                )
        self._set_counters({name: int(state[name]) for name in counters}, stepped)
        self.state = (
            {name: {slot: np.array(state[f"{name}.{slot}"]) for slot in self.slots} for name in params}
            if stepped
            else {}
        )
        return self

    def _counters(self) -> dict[str, np.ndarray]:
        """Scalar state beside the per-parameter arrays."""
        return {}

    def _set_counters(self, counters: dict[str, int], stepped: bool) -> None:
        """Take checked counters (`stepped`: the per-parameter arrays are there)."""

    def _scratch(self, like: np.ndarray) -> np.ndarray:
        """A work array of `like`'s shape and dtype, one buffer reused for every parameter
        and step: updates run in place, with no temporary arrays to allocate."""
        if self._work is None or self._work.size < like.size or self._work.dtype != like.dtype:
            self._work = np.empty(like.size, dtype=like.dtype)
        return self._work[: like.size].reshape(like.shape)

    def _decayed(self, name: str, param: np.ndarray, grad: np.ndarray) -> np.ndarray:
        if self.weight_decay and name.endswith(".W"):
            return grad + self.weight_decay * param
        return grad

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for name, param in params.items():
            self._update(name, param, self._decayed(name, param, grads[name]))

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """SGD; with momentum it keeps a velocity v = momentum * v - lr * g.

    Nesterov uses the look-ahead form w += momentum * v - lr * g (after
    updating v), as in Sutskever et al. 2013 and PyTorch.
    """

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)
        self.momentum = _in_range("momentum", momentum, 0.0, 1.0)
        if nesterov and not self.momentum:
            raise ValueError("nesterov needs momentum > 0")
        self.nesterov = nesterov
        self.slots = ("momentum_buffer",) if self.momentum else ()

    def _update(self, name, param, grad):
        step = np.multiply(grad, self.lr, out=self._scratch(param))  # lr * g
        if not self.momentum:
            param -= step
            return
        slot = self.state.setdefault(name, {"momentum_buffer": np.zeros_like(param)})
        velocity = slot["momentum_buffer"]
        velocity *= self.momentum
        velocity -= step
        if self.nesterov:
            look_ahead = self.momentum * velocity
            look_ahead -= step
            param += look_ahead
        else:
            param += velocity


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias-corrected moment estimates."""

    slots = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(lr, weight_decay)
        self.beta1 = _in_range("beta1", beta1, 0.0, 1.0)
        self.beta2 = _in_range("beta2", beta2, 0.0, 1.0)
        self.eps = _positive("eps", eps)
        self.steps = 0

    def step(self, params, grads):
        self.steps += 1
        super().step(params, grads)

    def _counters(self):
        return {"step": np.array(self.steps, dtype=np.int64)}

    def _set_counters(self, counters, stepped):
        if counters["step"] < 0 or (counters["step"] > 0) != stepped:
            raise ValueError(
                f"Adam state does not fit: step {counters['step']} with "
                f"{'' if stepped else 'no '}moment estimates"
            )
        self.steps = counters["step"]

    def _update(self, name, param, grad):
        slot = self.state.setdefault(
            name, {"exp_avg": np.zeros_like(param), "exp_avg_sq": np.zeros_like(param)}
        )
        m, v, work = slot["exp_avg"], slot["exp_avg_sq"], self._scratch(param)
        m *= self.beta1
        m += np.multiply(grad, 1 - self.beta1, out=work)
        v *= self.beta2
        np.multiply(grad, grad, out=work)
        work *= 1 - self.beta2
        v += work
        step_size = self.lr * math.sqrt(1 - self.beta2**self.steps) / (1 - self.beta1**self.steps)
        # param -= step_size * m / (sqrt(v) + eps), as PyTorch orders it: m / denominator first.
        np.sqrt(v, out=work)
        work += self.eps
        np.divide(m, work, out=work)
        work *= step_size
        param -= work


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")


def make_optimizer(name: str, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0) -> Optimizer:
    """An optimiser by name: 'sgd', 'momentum', 'nesterov' or 'adam'."""
    if name == "sgd":
        return SGD(lr, weight_decay=weight_decay)
    if name in ("momentum", "nesterov"):
        return SGD(lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=weight_decay)
    if name == "adam":
        return Adam(lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate for 0-based `step` of `total_steps`.

    "cosine" anneals from base_lr towards 0 along half a cosine
    (Loshchilov & Hutter 2017, without restarts), as PyTorch's
    CosineAnnealingLR with eta_min=0.
    """
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")
