"""Optimisers: minibatch SGD (plain, momentum, Nesterov) and Adam, in PyTorch's forms.

`step(params, grads)` updates the named parameter arrays in place; the
gradient arrays are only read. Optional L2 weight decay adds
`weight_decay * p` to the gradient of the parameters named in `decayed`
(a model's `decayed_parameters()`: those its layers declare, weights and
not biases), before momentum or Adam's moments see it, as PyTorch's
`weight_decay` does for the parameters it is given. Learning rates and
other settings are Python floats, so float32 parameters stay float32.

The updates are PyTorch's (torch.optim.SGD with dampening 0, torch.optim.Adam
without amsgrad), so that a run here and the same run in PyTorch follow
one trajectory; tests/test_optim_conventions.py steps both side by side.

`state_dict()` / `load_state_dict()` carry what an optimiser has learnt
(momentum buffers; Adam's moments and step count) as plain arrays by
name, PyTorch's names: `PARAM.momentum_buffer`, `PARAM.exp_avg`,
`PARAM.exp_avg_sq` and `step`. A run resumed with the state saved at a
step goes on exactly as the unbroken run would have. Settings (learning
rate, betas, ...) are not state: they come from the hyperparameters.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

# A momentum state's "momentum_form": PyTorch's buffer (buf = momentum * buf + g). States saved
# before it carry no such scalar: their momentum_buffer held the velocity v = momentum * v - lr * g,
# which continues nothing here (see SGD.load_state_dict).
MOMENTUM_FORM = 1


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

    def __init__(self, lr: float, weight_decay: float = 0.0, decayed: Collection[str] | None = None):
        self.lr = _positive("learning_rate", lr)
        self.weight_decay = _in_range("weight_decay", weight_decay, 0.0, 1.0)
        if self.weight_decay and decayed is None:  # a guess by name would miss a layer's own names
            raise ValueError(
                "weight_decay needs decayed: the names of the parameters it applies to "
                "(Model.decayed_parameters())"
            )
        self.decayed = frozenset(decayed or ())
        self.state: dict[str, dict[str, np.ndarray]] = {}  # parameter -> slot -> array
        self._work: np.ndarray | None = None  # see _scratch; not state

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state by name (the live arrays, not copies, like Model.state_dict).

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
        if self.weight_decay and name in self.decayed:
            return grad + self.weight_decay * param
        return grad

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for name, param in params.items():
            self._update(name, param, self._decayed(name, param, grads[name]))

    def _update(self, name: str, param: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """SGD; with momentum, PyTorch's buffer form (torch.optim.SGD, dampening 0).

    The buffer is a decaying sum of gradients, buf = momentum * buf + g
    (buf = g at the first step, as PyTorch starts it), and the step is
    lr * buf; Nesterov's is lr * (g + momentum * buf). Why not the velocity
    v = momentum * v - lr * g (Sutskever et al. 2013): the two agree only
    while the rate is constant (then v = -lr * buf). Under a schedule the
    velocity keeps moving at the rates of past steps and the buffer does not:
    over 50 cosine-annealed steps the trajectories part by about 40 % of their
    whole displacement. PyTorch keeps the buffer, and so does this.
    """

    def __init__(
        self,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        decayed: Collection[str] | None = None,
    ):
        super().__init__(lr, weight_decay, decayed)
        self.momentum = _in_range("momentum", momentum, 0.0, 1.0)
        if nesterov and not self.momentum:
            raise ValueError("nesterov needs momentum > 0")
        self.nesterov = nesterov
        self.slots = ("momentum_buffer",) if self.momentum else ()

    def load_state_dict(self, state, params):
        """As `Optimizer.load_state_dict`; a momentum state must carry `momentum_form` 1.

        A state without it comes from a Tandem that kept the velocity form: its
        buffers hold velocities, decaying sums of past steps (-lr * g) rather than
        of gradients, and are refused rather than misread.
        """
        if (
            self.momentum
            and "momentum_form" not in state
            and any(n.endswith(".momentum_buffer") for n in state)
        ):
            raise ValueError(
                "SGD state holds momentum in the velocity form (v = momentum * v - lr * g) of an "
                "older Tandem, not the buffer (buf = momentum * buf + g) this one keeps, as PyTorch "
                "does; it cannot be continued: start with a fresh optimiser"
            )
        return super().load_state_dict(state, params)

    def _counters(self):
        return {"momentum_form": np.array(MOMENTUM_FORM, dtype=np.int64)} if self.momentum else {}

    def _set_counters(self, counters, stepped):
        if self.momentum and counters["momentum_form"] != MOMENTUM_FORM:
            raise ValueError(
                f"SGD state has momentum_form {counters['momentum_form']}; this build knows "
                f"{MOMENTUM_FORM} (PyTorch's momentum buffer) only"
            )

    def _update(self, name, param, grad):
        step = self._scratch(param)
        if not self.momentum:
            param -= np.multiply(grad, self.lr, out=step)
            return
        slot = self.state.get(name)
        if slot is None:
            buffer = np.array(grad, dtype=param.dtype)  # a copy: the gradient is only read
            self.state[name] = {"momentum_buffer": buffer}
        else:
            buffer = slot["momentum_buffer"]
            buffer *= self.momentum
            buffer += grad
        if self.nesterov:  # lr * (g + momentum * buf)
            np.multiply(buffer, self.momentum, out=step)
            step += grad
            step *= self.lr
        else:
            np.multiply(buffer, self.lr, out=step)
        param -= step


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias-corrected moment estimates, as torch.optim.Adam.

    The step is lr * m-hat / (sqrt(v-hat) + eps), with m-hat = m / (1 - beta1^t)
    and v-hat = v / (1 - beta2^t): eps is added after the bias correction,
    as in the paper and PyTorch. (Keras adds it to sqrt(v) before the
    correction, which weighs eps 1 / sqrt(1 - beta2^t) times more: over 50
    steps the displacements differ by 0.1-0.3 % at gradients near 1e-3 and by
    about 40 % near 1e-7.)
    """

    slots = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decayed: Collection[str] | None = None,
    ):
        super().__init__(lr, weight_decay, decayed)
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
        # param -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), in PyTorch's order.
        np.sqrt(v, out=work)
        work /= math.sqrt(1 - self.beta2**self.steps)
        work += self.eps
        np.divide(m, work, out=work)
        work *= self.lr / (1 - self.beta1**self.steps)
        param -= work


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")


def make_optimizer(
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    decayed: Collection[str] | None = None,
) -> Optimizer:
    """An optimiser by name: 'sgd', 'momentum', 'nesterov' or 'adam'.

    `weight_decay` applies to the parameters named in `decayed` (needed with
    it: a model's `decayed_parameters()`).
    """
    if name == "sgd":
        return SGD(lr, weight_decay=weight_decay, decayed=decayed)
    if name in ("momentum", "nesterov"):
        return SGD(
            lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=weight_decay, decayed=decayed
        )
    if name == "adam":
        return Adam(lr, weight_decay=weight_decay, decayed=decayed)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The learning rate for 0-based `step` of `total_steps`.

    The first `warmup_steps` warm up linearly: base_lr * (step + 1) / warmup_steps,
    so the warm-up's last step runs at base_lr and its first at a small rate,
    not at 0 (a step at rate 0 would be a step wasted). The schedule runs over
    the steps after the warm-up: "constant" stays at base_lr; "cosine"
    anneals from base_lr towards 0 along half a cosine (Loshchilov & Hutter
    2017, without restarts), as PyTorch's CosineAnnealingLR with eta_min=0.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warm-up steps must be in [0, {total_steps}), got {warmup_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))
    return base_lr


def warmup_step_count(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """`warmup_epochs` in whole steps: rounded, at least one for any warm-up, and short of
    `total_steps` (the schedule keeps a step)."""
    if not warmup_epochs:
        return 0
    return min(max(round(warmup_epochs * steps_per_epoch), 1), total_steps - 1)
