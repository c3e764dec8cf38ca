"""The optimisers follow PyTorch: side by side with torch.optim, and against the formulas alone.

The NumPy-only tests check each update against the formula it implements
(the Adam paper's Algorithm 1, PyTorch's documented SGD), so a machine
without torch still checks the forms; the torch tests step both for 50 steps
on the same parameters and gradients, in float64. Errors are measured on the
displacement (parameters now minus at the start), which is what the
optimiser computes: relative to the parameters themselves every error
would look tiny.
"""

import math

import numpy as np
import pytest

from shared.nn import SGD, Adam, build_model
from shared.nn.layers import Layer
from shared.nn.model import Model
from shared.nn.optim import scheduled_lr

STEPS = 50
SHAPES = {"layers.0.W": (4, 3), "layers.0.b": (3,), "layers.1.W": (2, 3, 2, 2)}
AGREE = 1e-12  # relative, on the displacement; float64


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip(
        "torch",
        reason="torch (the benchmark peer, not in the dev lock) is not installed: "
        "THE SIDE-BY-SIDE CHECKS AGAINST torch.optim DID NOT RUN",
    )


def problem(scale: float, seed: int = 0):
    """Parameters near 1 and STEPS steps of random gradients of about `scale`."""
    rng = np.random.default_rng(seed)
    params = {name: 1 + rng.standard_normal(shape) for name, shape in SHAPES.items()}
    grads = [
        {name: scale * rng.standard_normal(shape) for name, shape in SHAPES.items()} for _ in range(STEPS)
    ]
    return params, grads


def cosine_rates(lr: float, warmup_steps: int = 0) -> list[float]:
    return [scheduled_lr(lr, "cosine", t, STEPS, warmup_steps) for t in range(STEPS)]


def run_ours(optimizer, params, grads, rates=None):
    params = {name: p.copy() for name, p in params.items()}
    for t, step_grads in enumerate(grads):
        if rates:
            optimizer.lr = rates[t]
        optimizer.step(params, step_grads)
    return params


def run_torch(torch, make, params, grads, rates=None, decayed=frozenset(), weight_decay=0.0):
    """torch.optim on the same steps (weight decay on the `decayed` parameters' group only):
    the parameters and torch's state of each, by our names."""
    tensors = {name: torch.tensor(p, requires_grad=True) for name, p in params.items()}
    groups = [
        {"params": [t for n, t in tensors.items() if n in decayed], "weight_decay": weight_decay},
        {"params": [t for n, t in tensors.items() if n not in decayed], "weight_decay": 0.0},
    ]
    optimizer = make([g for g in groups if g["params"]])
    for t, step_grads in enumerate(grads):
        for name, tensor in tensors.items():
            tensor.grad = torch.tensor(step_grads[name])
        if rates:
            for group in optimizer.param_groups:
                group["lr"] = rates[t]
        optimizer.step()
    state = {name: {k: v.numpy() for k, v in optimizer.state[t].items()} for name, t in tensors.items()}
    return {name: t.detach().numpy() for name, t in tensors.items()}, state


def displacement_error(ours, theirs, start) -> float:
    """max |our displacement - theirs| / max |theirs|, over every parameter."""
    worst = max(np.abs((ours[n] - start[n]) - (theirs[n] - start[n])).max() for n in start)
    return worst / max(np.abs(theirs[n] - start[n]).max() for n in start)


# ---------------------------------------------------------------- Adam


def paper_adam(params, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """Kingma & Ba 2015, Algorithm 1, as written."""
    params = {name: p.copy() for name, p in params.items()}
    m = {name: np.zeros_like(p) for name, p in params.items()}
    v = {name: np.zeros_like(p) for name, p in params.items()}
    for t, step_grads in enumerate(grads, start=1):
        for name, g in step_grads.items():
            m[name] = beta1 * m[name] + (1 - beta1) * g
            v[name] = beta2 * v[name] + (1 - beta2) * g * g
            m_hat = m[name] / (1 - beta1**t)
            v_hat = v[name] / (1 - beta2**t)
            params[name] = params[name] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return params


def keras_adam(params, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """The form Adam had here before: eps added to sqrt(v), before the bias correction."""
    params = {name: p.copy() for name, p in params.items()}
    m = {name: np.zeros_like(p) for name, p in params.items()}
    v = {name: np.zeros_like(p) for name, p in params.items()}
    for t, step_grads in enumerate(grads, start=1):
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        for name, g in step_grads.items():
            m[name] = beta1 * m[name] + (1 - beta1) * g
            v[name] = beta2 * v[name] + (1 - beta2) * g * g
            params[name] = params[name] - step_size * m[name] / (np.sqrt(v[name]) + eps)
    return params


@pytest.mark.parametrize("scale", [1e-3, 1e-7])
def test_adam_follows_the_papers_formula_where_eps_comes_after_the_bias_correction(scale):
    params, grads = problem(scale)
    ours = run_ours(Adam(1e-3), params, grads)
    assert displacement_error(ours, paper_adam(params, grads), params) < AGREE
    # The form it replaces differs measurably, most where eps is near sqrt(v): small gradients.
    assert displacement_error(keras_adam(params, grads), paper_adam(params, grads), params) > (
        1e-4 if scale == 1e-3 else 0.1
    )


@pytest.mark.parametrize("scale", [1e-3, 1e-7])
def test_adam_matches_torch_step_by_step(torch, scale):
    params, grads = problem(scale, seed=1)
    theirs, _ = run_torch(torch, lambda groups: torch.optim.Adam(groups, lr=1e-3), params, grads)
    assert displacement_error(run_ours(Adam(1e-3), params, grads), theirs, params) < AGREE


# ---------------------------------------------------------------- SGD with momentum


def pytorch_sgd(params, grads, rates, momentum, nesterov, weight_decay=0.0, decayed=frozenset()):
    """PyTorch's documented SGD (dampening 0): buf = g at first, then momentum * buf + g."""
    params = {name: p.copy() for name, p in params.items()}
    buf: dict[str, np.ndarray] = {}
    for lr, step_grads in zip(rates, grads, strict=True):
        for name, raw in step_grads.items():
            g = raw + weight_decay * params[name] if name in decayed else raw
            buf[name] = g.copy() if name not in buf else momentum * buf[name] + g
            direction = g + momentum * buf[name] if nesterov else buf[name]
            params[name] = params[name] - lr * direction
    return params


def velocity_sgd(params, grads, rates, momentum):
    """The form momentum had here before: v = momentum * v - lr * g; p += v."""
    params = {name: p.copy() for name, p in params.items()}
    v = {name: np.zeros_like(p) for name, p in params.items()}
    for lr, step_grads in zip(rates, grads, strict=True):
        for name, g in step_grads.items():
            v[name] = momentum * v[name] - lr * g
            params[name] = params[name] + v[name]
    return params


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_momentum_keeps_pytorchs_buffer_under_a_changing_rate(nesterov):
    params, grads = problem(1.0)
    rates = cosine_rates(0.05)
    ours = run_ours(SGD(0.05, momentum=0.9, nesterov=nesterov), params, grads, rates)
    assert displacement_error(ours, pytorch_sgd(params, grads, rates, 0.9, nesterov), params) < AGREE
    if not nesterov:  # the velocity form parts from it as soon as the rate changes
        velocity = velocity_sgd(params, grads, rates, 0.9)
        assert displacement_error(velocity, pytorch_sgd(params, grads, rates, 0.9, False), params) > 0.1


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_momentum_matches_torch_with_a_warmed_up_cosine_rate_and_weight_decay(torch, nesterov):
    params, grads = problem(1.0, seed=2)
    rates = cosine_rates(0.05, warmup_steps=5)
    decayed = frozenset({"layers.0.W", "layers.1.W"})
    optimizer = SGD(0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01, decayed=decayed)
    ours = run_ours(optimizer, params, grads, rates)
    theirs, torch_state = run_torch(
        torch,
        lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=nesterov),
        params,
        grads,
        rates,
        decayed=decayed,
        weight_decay=0.01,
    )
    assert displacement_error(ours, theirs, params) < AGREE
    for name in SHAPES:  # momentum_buffer means what it means in torch
        buffer, torch_buffer = optimizer.state[name]["momentum_buffer"], torch_state[name]["momentum_buffer"]
        assert np.abs(buffer - torch_buffer).max() < AGREE * np.abs(torch_buffer).max(), name


def test_adam_with_weight_decay_matches_torch(torch):
    params, grads = problem(1e-3, seed=3)
    decayed = frozenset({"layers.1.W"})
    ours = run_ours(Adam(1e-3, weight_decay=0.1, decayed=decayed), params, grads)
    theirs, _ = run_torch(
        torch,
        lambda groups: torch.optim.Adam(groups, lr=1e-3),
        params,
        grads,
        decayed=decayed,
        weight_decay=0.1,
    )
    assert displacement_error(ours, theirs, params) < AGREE


# ---------------------------------------------------------------- weight decay by declaration


class Scaled(Layer):
    """A layer with names of its own: a decayed "kernel" and a "scale" that is not."""

    type_name = "scaled"
    decayed_params = ("kernel",)

    def param_shapes(self):
        return {"kernel": (2,), "scale": (2,)}


def test_a_model_decays_the_parameters_its_layers_declare_whatever_their_names():
    conv = build_model(
        {
            "input_shape": [1, 6, 6],
            "layers": [
                {"type": "conv2d", "filters": 2},
                {"type": "relu"},
                {"type": "maxpool2d", "size": 2},
                {"type": "flatten"},
                {"type": "dense", "units": 3},
            ],
        }
    )
    assert conv.decayed_parameters() == {"layers.0.W", "layers.4.W"}
    assert Model({}, [Layer((2,)), Scaled((2,))]).decayed_parameters() == {"layers.1.kernel"}


def test_weight_decay_applies_to_the_declared_parameters_only():
    names = ["layers.0.kernel", "layers.0.scale", "layers.1.W", "layers.1.b"]
    params = {name: np.ones(2) for name in names}
    optimizer = SGD(0.5, weight_decay=0.1, decayed={"layers.0.kernel"})
    optimizer.step(params, {name: np.zeros(2) for name in names})
    assert {name: float(p[0]) for name, p in params.items()} == {
        "layers.0.kernel": 0.95,  # 1 - 0.5 * 0.1 * 1
        "layers.0.scale": 1.0,
        "layers.1.W": 1.0,  # not declared: no decay, for all its name
        "layers.1.b": 1.0,
    }


def test_weight_decay_without_the_parameters_it_applies_to_is_refused():
    with pytest.raises(ValueError, match=r"weight_decay needs decayed"):
        Adam(1e-3, weight_decay=0.1)
    assert SGD(0.1, weight_decay=0.1, decayed=()).decayed == frozenset()  # none, said so
