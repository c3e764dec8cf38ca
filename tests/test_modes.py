"""Training and evaluation modes, and the model's state: parameters, buffers, state_dict.

Dropout and BatchNorm compute one function in training and another at
evaluation; every path that is not a training step (predict_proba, fit's
evaluation, serving) must see the second. Runs with them stay bit-identical
per seed and when resumed at any step.
"""

import numpy as np
import pytest

from shared.nn import Adam, StepEvent, StopTraining, build_model, evaluate, fit, make_optimizer
from shared.nn.cost import buffer_count, parameter_count, training_memory_bytes

LAYERS = [
    {"type": "dense", "units": 16},
    {"type": "batchnorm"},
    {"type": "gelu"},
    {"type": "dropout", "rate": 0.3},
    {"type": "dense", "units": 3},
]
SPEC = {"input_shape": [6], "layers": LAYERS}


def blobs(seed=0, n=240):
    """Three separable blobs in 6-D, off centre so that BatchNorm has something to learn."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = rng.standard_normal((3, 6)) * 3 + 5
    x = (centres[y] + rng.standard_normal((n, 6))).astype(np.float32)
    return x, y


def trained(seed=0, epochs=3, **kwargs):
    x, y = blobs()
    model = build_model(SPEC).initialise(seed)
    fit(model, Adam(1e-2), x, y, epochs=epochs, batch_size=32, seed=seed, **kwargs)
    return model


def state_bytes(model) -> dict[str, bytes]:
    return {name: array.tobytes() for name, array in model.state_dict().items()}


def test_evaluation_is_deterministic_and_uses_the_running_statistics():
    model = trained()
    x, y = blobs(seed=1, n=50)
    running_var = model.buffers()["layers.1.running_var"]
    assert not np.allclose(running_var, 1)  # training moved it
    probabilities = model.predict_proba(x)
    np.testing.assert_array_equal(model.predict_proba(x), probabilities)  # no dropout
    np.testing.assert_array_equal(model.predict_proba(x[:7]), probabilities[:7])  # no batch statistics
    assert evaluate(model, x, y) == evaluate(model, x, y)

    running_var *= 4  # the live buffer: evaluation reads it
    assert not np.allclose(model.predict_proba(x), probabilities)


def test_a_training_forward_differs_from_evaluation_and_needs_a_step_seed():
    model = trained(epochs=1)
    x, y = blobs(seed=1, n=50)
    assert not np.allclose(model.forward(x, training=True), model.forward(x))
    with pytest.raises(RuntimeError, match="step_seed"):
        model.train_step_gradients(x, y)
    losses = [model.train_step_gradients(x, y, step_seed=(0, step))[0] for step in (5, 5, 6)]
    assert losses[0] == losses[1] != losses[2]  # the masks are those of the step, and only of it


def test_training_with_dropout_and_batchnorm_is_bit_identical_per_seed():
    a, b, c = trained(seed=7), trained(seed=7), trained(seed=8)
    assert state_bytes(a) == state_bytes(b)
    assert state_bytes(a)["layers.1.running_mean"] != state_bytes(c)["layers.1.running_mean"]


def test_a_run_resumed_mid_epoch_ends_bit_identical_dropout_masks_and_running_statistics_included():
    x, y = blobs()
    optimizer = make_optimizer("momentum", 0.05)
    saved: dict[str, dict[str, np.ndarray]] = {}
    interrupted = build_model(SPEC).initialise(4)

    def stop_after_step_11(event):
        if isinstance(event, StepEvent) and event.step == 11:
            optimizer_state = {name: array.copy() for name, array in optimizer.state_dict().items()}
            saved.update(model=interrupted.state_dict(), optimizer=optimizer_state)
            raise StopTraining

    fit(interrupted, optimizer, x, y, epochs=3, batch_size=32, seed=4, callback=stop_after_step_11)
    unbroken = build_model(SPEC).initialise(4)
    fit(unbroken, make_optimizer("momentum", 0.05), x, y, epochs=3, batch_size=32, seed=4)

    resumed = build_model(SPEC).load_state_dict(saved["model"])
    resumed_optimizer = make_optimizer("momentum", 0.05).load_state_dict(
        saved["optimizer"], resumed.parameters()
    )
    fit(resumed, resumed_optimizer, x, y, epochs=3, batch_size=32, seed=4, start_step=11)
    assert state_bytes(resumed) == state_bytes(unbroken)


def test_state_dict_is_a_copy_of_parameters_and_buffers_and_load_state_dict_copies():
    model = trained(epochs=1)
    state = model.state_dict()
    assert state.keys() == model.param_shapes().keys() | model.buffer_shapes().keys()
    live = {**model.parameters(), **model.buffers()}
    for name, array in state.items():
        np.testing.assert_array_equal(array, live[name])
        assert not np.shares_memory(array, live[name])
    state["layers.1.running_mean"][:] = 123.0
    state["layers.0.W"][:] = 0.0
    assert not (model.buffers()["layers.1.running_mean"] == 123.0).any()
    assert model.parameters()["layers.0.W"].any()

    other = build_model(SPEC).load_state_dict(state)
    state["layers.0.W"][:] = 1.0  # the caller's arrays stay the caller's
    assert not other.parameters()["layers.0.W"].any()
    np.testing.assert_array_equal(other.buffers()["layers.1.running_mean"], 123.0)
    with pytest.raises(ValueError, match=r"missing \['layers.1.running_var'\]"):
        build_model(SPEC).load_state_dict({k: v for k, v in state.items() if k != "layers.1.running_var"})


def test_the_optimiser_steps_parameters_only():
    model = trained(epochs=1)
    assert model.gradients().keys() == model.parameters().keys()
    assert "layers.1.running_mean" not in model.parameters()


def test_cost_counts_new_layers_parameters_buffers_and_what_they_keep():
    model = build_model(SPEC)
    assert parameter_count(model) == 6 * 16 + 16 + 2 * 16 + 16 * 3 + 3
    assert buffer_count(model) == 2 * 16
    without_dropout = build_model({"input_shape": [6], "layers": [*LAYERS[:3], LAYERS[4]]})
    batch = 10_000  # large enough for training, not evaluation, to be the peak
    difference = training_memory_bytes(model, batch, 2) - training_memory_bytes(without_dropout, batch, 2)
    assert difference == 4 * batch * (16 + 16 + 16)  # dropout's input, output and mask per sample
