"""The training loop, optimisers and the seeds' digits CNN."""

import itertools

import numpy as np
import pytest
import safetensors.numpy
from threadpoolctl import threadpool_limits

from shared.data import load_dataset
from shared.nn import SGD, Adam, EpochEvent, StepEvent, StopTraining, build_model, fit, make_optimizer
from shared.nn.presets import get_preset
from shared.nn.run import Hyperparameters, prepare_optimizer, train


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


MLP_SPEC = {
    "input_shape": [6],
    "layers": [{"type": "dense", "units": 16}, {"type": "relu"}, {"type": "dense", "units": 3}],
}


def fresh_fit(seed, dtype=np.float32, **kwargs):
    x, y = small_problem()
    model = build_model(MLP_SPEC, dtype=dtype).initialise(seed)
    history = fit(
        model,
        make_optimizer("adam", 1e-2),
        x,
        y,
        epochs=kwargs.pop("epochs", 3),
        batch_size=32,
        seed=seed,
        x_test=x,
        y_test=y,
        **kwargs,
    )
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
    assert set(history.epochs[0]) == {
        "epoch",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "seconds",
    }


def weights_bytes(model) -> dict[str, bytes]:
    return {name: weights.tobytes() for name, weights in model.state_dict().items()}


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_resuming_mid_epoch_with_the_optimizers_state_ends_bit_identical(name):
    """Resumed with its weights and its optimiser's state (through safetensors bytes), a run
    ends bit-identical to an unbroken one; with a fresh optimiser only plain SGD does."""
    x, y = small_problem()
    unbroken = build_model(MLP_SPEC).initialise(0)
    fit(unbroken, make_optimizer(name, 0.05), x, y, epochs=3, batch_size=32, seed=4)

    optimizer, saved = make_optimizer(name, 0.05), {}

    def stop_after_step_11(event):  # holds the optimiser, as the trainer's callback does
        if isinstance(event, StepEvent) and event.step == 11:
            saved.update(safetensors.numpy.load(safetensors.numpy.save(optimizer.state_dict())))
            raise StopTraining

    interrupted = build_model(MLP_SPEC).initialise(0)
    fit(interrupted, optimizer, x, y, epochs=3, batch_size=32, seed=4, callback=stop_after_step_11)
    weights = interrupted.state_dict()
    resumed = make_optimizer(name, 0.05).load_state_dict(saved, interrupted.parameters())
    history = fit(interrupted, resumed, x, y, epochs=3, batch_size=32, seed=4, start_step=11)
    assert history.steps == 24 and [e["epoch"] for e in history.epochs] == [2, 3]
    assert weights_bytes(interrupted) == weights_bytes(unbroken)

    fresh = build_model(MLP_SPEC).load_state_dict(weights)
    fit(fresh, make_optimizer(name, 0.05), x, y, epochs=3, batch_size=32, seed=4, start_step=11)
    assert (weights_bytes(fresh) == weights_bytes(unbroken)) == (name == "sgd")


PARAMS = {"layers.0.W": np.ones((2, 3), np.float32), "layers.0.b": np.ones(3, np.float32)}
GRADS = {"layers.0.W": np.full((2, 3), 0.5, np.float32), "layers.0.b": np.full(3, -0.5, np.float32)}


def stepped(optimizer, steps: int = 2):
    params = {k: v.copy() for k, v in PARAMS.items()}
    for _ in range(steps):
        optimizer.step(params, GRADS)
    return optimizer


MOMENTUM_NAMES = ["layers.0.W.momentum_buffer", "layers.0.b.momentum_buffer", "momentum_form"]


@pytest.mark.parametrize(
    "make, names",
    [
        (lambda: SGD(0.1), []),
        (lambda: SGD(0.1, momentum=0.9), MOMENTUM_NAMES),
        (lambda: SGD(0.1, momentum=0.9, nesterov=True), MOMENTUM_NAMES),
        (
            lambda: Adam(0.1),
            [
                "layers.0.W.exp_avg",
                "layers.0.W.exp_avg_sq",
                "layers.0.b.exp_avg",
                "layers.0.b.exp_avg_sq",
                "step",
            ],
        ),
    ],
    ids=["sgd", "momentum", "nesterov", "adam"],
)
def test_an_optimizers_state_dict_round_trips_as_plain_arrays(make, names):
    state = stepped(make()).state_dict()
    assert sorted(state) == names and all(isinstance(a, np.ndarray) for a in state.values())
    if "step" in state:
        assert state["step"].dtype == np.int64 and state["step"].shape == () and state["step"] == 2
    if "momentum_form" in state:  # PyTorch's buffer, not the velocity form of before
        assert state["momentum_form"].dtype == np.int64 and state["momentum_form"] == 1
    loaded = make().load_state_dict(state, PARAMS).state_dict()
    assert {k: (v.dtype, v.tobytes()) for k, v in loaded.items()} == {
        k: (v.dtype, v.tobytes()) for k, v in state.items()
    }
    for array in state.values():  # loading copies: nothing is shared with the state given
        assert not any(np.shares_memory(array, other) for other in loaded.values())
    # The state of an optimiser that has not stepped yet loads too.
    assert make().load_state_dict(make().state_dict(), PARAMS).state_dict().keys() <= {
        "step",
        "momentum_form",
    }


def adam_state(**changes):
    state = {k: v.copy() for k, v in stepped(Adam(0.1)).state_dict().items()}
    return {k: v for k, v in {**state, **changes}.items() if v is not None}


@pytest.mark.parametrize(
    "optimizer, state, words",
    [
        (Adam(0.1), adam_state(**{"layers.0.W.exp_avg": None}), ["missing ['layers.0.W.exp_avg']"]),
        (Adam(0.1), adam_state(step=None), ["missing ['step']"]),
        (
            Adam(0.1),
            adam_state(**{"layers.1.W.exp_avg": np.ones(3, np.float32)}),
            ["unknown ['layers.1.W.exp_avg']"],
        ),
        (
            Adam(0.1),
            adam_state(**{"layers.0.b.exp_avg_sq": np.ones(4, np.float32)}),
            ["layers.0.b.exp_avg_sq", "[4]", "[3]"],
        ),
        (
            Adam(0.1),
            adam_state(**{"layers.0.W.exp_avg": np.ones((2, 3), np.float64)}),
            ["layers.0.W.exp_avg", "float64", "needs float32"],
        ),
        (Adam(0.1), adam_state(step=np.array(2.0)), ["step", "float64", "needs int64"]),
        (Adam(0.1), adam_state(step=np.array(0, np.int64)), ["step 0 with moment estimates"]),
        (Adam(0.1), {"step": np.array(3, np.int64)}, ["step 3 with no moment estimates"]),
        (SGD(0.1, momentum=0.9), adam_state(), ["SGD state", "unknown", "step"]),
        (
            SGD(0.1, momentum=0.9),
            {k: v for k, v in stepped(SGD(0.1, momentum=0.9)).state_dict().items() if k != "momentum_form"},
            ["velocity form", "older Tandem", "fresh optimiser"],
        ),
        (
            SGD(0.1, momentum=0.9, nesterov=True),
            {**stepped(SGD(0.1, momentum=0.9)).state_dict(), "momentum_form": np.array(2, np.int64)},
            ["momentum_form 2", "PyTorch's momentum buffer"],
        ),
        (SGD(0.1), stepped(SGD(0.1, momentum=0.9)).state_dict(), ["unknown ['layers.0.W.momentum_buffer'"]),
    ],
)
def test_an_optimizer_refuses_a_state_that_does_not_fit(optimizer, state, words):
    before = {k: v.copy() for k, v in stepped(optimizer, 1).state_dict().items()}
    with pytest.raises(ValueError) as refused:
        optimizer.load_state_dict(state, PARAMS)
    for word in words:
        assert word in str(refused.value), str(refused.value)
    after = optimizer.state_dict()  # left as it was
    assert {k: v.tobytes() for k, v in after.items()} == {k: v.tobytes() for k, v in before.items()}


def test_callback_sees_every_step_and_epoch():
    events: list[StepEvent | EpochEvent] = []
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
    history = fit(
        model,
        make_optimizer("adam", 0.05),
        x,
        y_noise,
        epochs=40,
        batch_size=16,
        seed=0,
        validation_split=0.25,
        early_stopping=EarlyStopping(patience=2),
    )
    assert history.stop_reason == "early_stopping"
    assert history.best_epoch is not None
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
    fit(
        build_model(MLP_SPEC).initialise(0),
        optimizer,
        x,
        y,
        epochs=3,
        batch_size=32,
        seed=0,
        lr_schedule="cosine",
        callback=lambda e: rates.append(optimizer.lr) if isinstance(e, StepEvent) else None,
    )
    assert rates[0] == 0.1 and rates[-1] < 0.001
    assert all(a > b for a, b in itertools.pairwise(rates))
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        fit(
            build_model(MLP_SPEC).initialise(0),
            optimizer,
            x,
            y,
            epochs=1,
            batch_size=32,
            seed=0,
            lr_schedule="linear",
        )


def test_optimisers_update_in_place_and_leave_gradients_alone():
    for optimizer in (
        SGD(0.1),
        SGD(0.1, momentum=0.9),
        SGD(0.1, momentum=0.9, nesterov=True),
        Adam(0.1),
        SGD(0.1, weight_decay=0.1, decayed={"layers.0.W"}),
    ):
        params = {
            "layers.0.W": np.array([3.0, -2.0], dtype=np.float32),
            "layers.0.b": np.array([1.0], dtype=np.float32),
        }
        start = {k: v.copy() for k, v in params.items()}
        for _ in range(200):  # minimise 0.5 * |p|^2, whose gradient is p
            grads = {k: v.copy() for k, v in params.items()}
            kept = {k: v.copy() for k, v in grads.items()}
            optimizer.step(params, grads)
            assert all(np.array_equal(grads[k], kept[k]) for k in grads)
        assert all(v.dtype == np.float32 for v in params.values())
        assert np.abs(params["layers.0.W"]).max() < 0.05 * np.abs(start["layers.0.W"]).max()


def test_a_training_run_decays_weights_not_biases():
    model = build_model(MLP_SPEC).initialise(0)
    optimizer = prepare_optimizer(
        model, Hyperparameters(optimizer="sgd", learning_rate=0.5, weight_decay=0.1)
    )
    assert optimizer.decayed == {"layers.0.W", "layers.2.W"}
    params = {name: np.ones(2) for name in ("layers.0.W", "layers.0.b")}
    optimizer.step(params, {name: np.zeros(2) for name in params})
    np.testing.assert_allclose(params["layers.0.W"], 0.95)
    np.testing.assert_allclose(params["layers.0.b"], 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learning_rate=0), "learning_rate must be > 0"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(optimizer="rmsprop"), "optimizer must be one of"),
        (dict(dtype="float16"), "dtype must be"),
        (dict(early_stopping_patience=3), "needs validation_split > 0"),
        (
            dict(validation_split=0.1, early_stopping_patience=3, early_stopping_monitor="loss"),
            "early_stopping.monitor must be one of",
        ),
    ],
)
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
    """Seed 002's CNN: at least 98.8 % on the held-out 10 %, mean over 3 seeds (its article: 98.3 %).

    One test sample is 0.19 points of the mean, and BLAS sums in another order at another thread
    count: at 1 thread the seeds give 98.32, 98.88 and 100 % (mean 99.07 %), at 2 threads 98.32,
    98.88 and 99.44 % (98.88 %). One thread makes the figure the same on every machine's count.
    """
    preset = get_preset("digits-cnn")
    spec = preset.spec(digits.input_shape, digits.num_classes)
    with threadpool_limits(1):
        accuracies = [
            train(spec, digits, Hyperparameters.for_preset("digits-cnn", seed=seed)).history.epochs[-1][
                "test_accuracy"
            ]
            for seed in (0, 1, 2)
        ]
    assert np.mean(accuracies) >= 0.988, accuracies
