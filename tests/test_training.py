"""The training loop, optimisers and the seeds' digits CNN."""

import numpy as np
import pytest

from shared.data import load_dataset
from shared.nn import (SGD, Adam, EpochEvent, StepEvent, StopTraining, build_model, fit,
                       make_optimizer)
from shared.nn.presets import get_preset
from shared.training import Hyperparameters, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small_problem(seed=0, n=240):
    """Three separable blobs in 6-D: a fast, honest classification task."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = rng.standard_normal((3, 6)) * 3
    x = (centres[y] + rng.standard_normal((n, 6))).astype(np.float32)
    return x, y


MLP_SPEC = {"input_shape": [6], "layers": [{"type": "dense", "units": 16}, {"type": "relu"},
                                           {"type": "dense", "units": 3}]}


def fresh_fit(seed, dtype=np.float32, **kwargs):
    x, y = small_problem()
    model = build_model(MLP_SPEC, dtype=dtype).initialise(seed)
    history = fit(model, make_optimizer("adam", 1e-2), x, y, epochs=kwargs.pop("epochs", 3),
                  batch_size=32, seed=seed, x_test=x, y_test=y, **kwargs)
    return model, history


def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not():
    a, _ = fresh_fit(seed=7)
    b, _ = fresh_fit(seed=7)
    c, _ = fresh_fit(seed=8)
    for name, weights in a.state_dict().items():
        assert weights.tobytes() == b.state_dict()[name].tobytes()
    assert a.state_dict()["layers.0.W"].tobytes() != c.state_dict()["layers.0.W"].tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_learns_and_keeps_its_dtype(dtype):
    model, history = fresh_fit(seed=0, dtype=dtype, epochs=5)
    assert history.epochs[-1]["test_accuracy"] > 0.95
    assert history.epochs[-1]["train_loss"] < history.epochs[0]["train_loss"]
    assert all(w.dtype == dtype for w in model.state_dict().values())
    assert set(history.epochs[0]) == {"epoch", "train_loss", "train_accuracy", "test_loss",
                                      "test_accuracy", "seconds"}


def test_resuming_mid_epoch_replays_the_same_batches():
    """Plain SGD keeps no state, so a resumed run must end bit-identical to an unbroken one."""
    x, y = small_problem()
    unbroken = build_model(MLP_SPEC).initialise(0)
    fit(unbroken, make_optimizer("sgd", 0.05), x, y, epochs=3, batch_size=32, seed=4)

    def stop_after_step_11(event):
        if isinstance(event, StepEvent) and event.step == 11:
            raise StopTraining

    interrupted = build_model(MLP_SPEC).initialise(0)
    fit(interrupted, make_optimizer("sgd", 0.05), x, y, epochs=3, batch_size=32, seed=4,
        callback=stop_after_step_11)
    history = fit(interrupted, make_optimizer("sgd", 0.05), x, y, epochs=3, batch_size=32, seed=4,
                  start_step=11)
    assert history.steps == 24 and [e["epoch"] for e in history.epochs] == [2, 3]
    for name, weights in unbroken.state_dict().items():
        assert weights.tobytes() == interrupted.state_dict()[name].tobytes()


def test_callback_sees_every_step_and_epoch():
    events = []
    _, history = fresh_fit(seed=0, epochs=2, callback=events.append)
    steps = [e for e in events if isinstance(e, StepEvent)]
    epochs = [e for e in events if isinstance(e, EpochEvent)]
    assert len(steps) == history.steps == 2 * 8  # 240 samples / 32 per batch -> 8 steps
    assert [e.step for e in steps] == list(range(1, 17))
    assert [e.epoch for e in epochs] == [1, 2] and epochs[1].metrics == history.epochs[1]


def test_a_callback_stops_training_at_a_step_boundary():
    def stop_at_step_5(event):
        if isinstance(event, StepEvent) and event.step == 5:
            raise StopTraining

    _, history = fresh_fit(seed=0, epochs=3, callback=stop_at_step_5)
    assert history.stop_reason == "stopped" and history.steps == 5 and history.epochs == []


def test_early_stopping_restores_the_best_weights():
    from shared.data import stratified_split
    from shared.nn import EarlyStopping, evaluate

    x, y = small_problem(n=120)
    y_noise = np.random.default_rng(1).integers(0, 3, len(y))  # labels it cannot learn: val loss worsens
    model = build_model(MLP_SPEC).initialise(0)
    history = fit(model, make_optimizer("adam", 0.05), x, y_noise, epochs=40, batch_size=16, seed=0,
                  validation_split=0.25, early_stopping=EarlyStopping(patience=2))
    assert history.stop_reason == "early_stopping"
    assert len(history.epochs) == history.best_epoch + 2
    best = history.epochs[history.best_epoch - 1]["val_loss"]
    assert all(e["val_loss"] >= best for e in history.epochs)
    _, val_idx = stratified_split(y_noise, 0.25, seed=0)
    restored_loss, _ = evaluate(model, x[val_idx], y_noise[val_idx])
    assert restored_loss == pytest.approx(best, rel=1e-6)
    assert history.weights_epoch == history.best_epoch
    assert history.weights_metrics["val_loss"] == best


def test_cosine_schedule_anneals_from_the_base_rate_towards_zero():
    optimizer = make_optimizer("sgd", 0.1)
    rates = []
    x, y = small_problem()
    fit(build_model(MLP_SPEC).initialise(0), optimizer, x, y, epochs=3, batch_size=32, seed=0,
        lr_schedule="cosine",
        callback=lambda e: rates.append(optimizer.lr) if isinstance(e, StepEvent) else None)
    assert rates[0] == 0.1 and rates[-1] < 0.001
    assert all(a > b for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        fit(build_model(MLP_SPEC).initialise(0), optimizer, x, y, epochs=1, batch_size=32,
            seed=0, lr_schedule="linear")


def test_optimisers_update_in_place_and_leave_gradients_alone():
    for optimizer in (SGD(0.1), SGD(0.1, momentum=0.9), SGD(0.1, momentum=0.9, nesterov=True),
                      Adam(0.1), SGD(0.1, weight_decay=0.1)):
        params = {"layers.0.W": np.array([3.0, -2.0], dtype=np.float32),
                  "layers.0.b": np.array([1.0], dtype=np.float32)}
        start = {k: v.copy() for k, v in params.items()}
        for _ in range(200):  # minimise 0.5 * |p|^2, whose gradient is p
            grads = {k: v.copy() for k, v in params.items()}
            kept = {k: v.copy() for k, v in grads.items()}
            optimizer.step(params, grads)
            assert all(np.array_equal(grads[k], kept[k]) for k in grads)
        assert all(v.dtype == np.float32 for v in params.values())
        assert np.abs(params["layers.0.W"]).max() < 0.05 * np.abs(start["layers.0.W"]).max()


def test_weight_decay_applies_to_weights_not_biases():
    optimizer = SGD(0.5, weight_decay=0.1)
    params = {"layers.0.W": np.ones(2), "layers.0.b": np.ones(2)}
    optimizer.step(params, {"layers.0.W": np.zeros(2), "layers.0.b": np.zeros(2)})
    np.testing.assert_allclose(params["layers.0.W"], 0.95)
    np.testing.assert_allclose(params["layers.0.b"], 1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=0), "learning_rate must be > 0"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(optimizer="rmsprop"), "optimizer must be one of"),
    (dict(dtype="float16"), "dtype must be"),
    (dict(early_stopping_patience=3), "needs validation_split > 0"),
    (dict(validation_split=0.1, early_stopping_patience=3, early_stopping_monitor="loss"),
     "early_stopping.monitor must be one of"),
])
def test_bad_hyperparameters_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Hyperparameters(**kwargs)


def test_batch_larger_than_the_dataset_is_refused(digits):
    spec = get_preset("mlp").spec(digits.input_shape, 10, hidden=(8,))
    with pytest.raises(ValueError, match="batch_size must be between 1 and the 1618 training samples"):
        train(spec, digits, Hyperparameters(batch_size=5000, epochs=1))


def test_a_spec_that_does_not_fit_the_dataset_is_refused(digits):
    spec = get_preset("mlp").spec((1, 28, 28), 10)
    with pytest.raises(ValueError, match=r"input_shape \[1, 28, 28\] does not fit dataset 'digits'"):
        train(spec, digits, Hyperparameters(epochs=1))


def test_seed_digits_cnn_reaches_the_seeds_accuracy(digits):
    """Seed 002's CNN: at least 98.3 % on the held-out 10 %, mean over 3 seeds."""
    preset = get_preset("digits-cnn")
    spec = preset.spec(digits.input_shape, digits.num_classes)
    accuracies = [
        train(spec, digits, Hyperparameters.for_preset("digits-cnn", seed=seed)).history.epochs[-1]["test_accuracy"]
        for seed in (0, 1, 2)
    ]
    assert np.mean(accuracies) >= 0.983, accuracies
