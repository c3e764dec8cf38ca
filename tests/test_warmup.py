"""Learning-rate warm-up before the schedule, and the rate fit leaves the optimiser with."""

import argparse
import contextlib
import math
from typing import Any

import pytest
import safetensors.numpy

from shared.cli.flags import add_hyperparameter_flags, given_hyperparameters
from shared.nn import StepEvent, StopTraining, build_model, fit, make_optimizer
from shared.nn.optim import scheduled_lr, warmup_step_count
from shared.nn.run import Hyperparameters
from tests.test_training import MLP_SPEC, small_problem, weights_bytes


def test_warm_up_rises_linearly_to_the_base_rate_then_the_schedule_runs_over_the_rest():
    rates = [scheduled_lr(0.1, "cosine", step, 20, warmup_steps=4) for step in range(20)]
    assert rates[:5] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])  # the last warm-up step at the base
    assert rates[12] == pytest.approx(0.05)  # halfway through the 16 cosine steps
    assert rates[19] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    constant = [scheduled_lr(0.1, "constant", step, 20, warmup_steps=4) for step in range(20)]
    assert constant[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1]) and set(constant[3:]) == {0.1}
    # No warm-up is the schedule as it was, to the bit.
    assert [scheduled_lr(0.1, "cosine", step, 20) for step in range(20)] == [
        0.1 * 0.5 * (1 + math.cos(math.pi * step / 20)) for step in range(20)
    ]
    with pytest.raises(ValueError, match=r"warm-up steps must be in \[0, 20\), got 20"):
        scheduled_lr(0.1, "cosine", 0, 20, warmup_steps=20)


@pytest.mark.parametrize(
    "epochs, steps_per_epoch, total, expected",
    [(0.0, 8, 24, 0), (1.0, 8, 24, 8), (0.5, 8, 24, 4), (0.3, 10, 30, 3), (0.01, 8, 24, 1), (0.6, 1, 1, 0)],
)
def test_warm_up_epochs_are_whole_steps_at_least_one_and_short_of_the_run(
    epochs, steps_per_epoch, total, expected
):
    assert warmup_step_count(epochs, steps_per_epoch, total) == expected


def rates_seen(optimizer, **settings) -> list[float]:
    x, y = small_problem()
    rates: list[float] = []
    fit(
        build_model(MLP_SPEC).initialise(0),
        optimizer,
        x,
        y,
        batch_size=32,
        seed=0,
        callback=lambda e: rates.append(optimizer.lr) if isinstance(e, StepEvent) else None,
        **settings,
    )
    return rates


def test_fit_warms_up_then_anneals_and_gives_the_optimiser_its_base_rate_back():
    optimizer = make_optimizer("sgd", 0.1)
    rates = rates_seen(optimizer, epochs=3, lr_schedule="cosine", warmup_epochs=1)  # 8 steps an epoch
    assert rates[:8] == pytest.approx([0.1 * (step + 1) / 8 for step in range(8)])
    assert rates[8] == 0.1 and rates[-1] < 0.001
    assert optimizer.lr == 0.1  # not the last step's rate
    with pytest.raises(ValueError, match=r"warmup_epochs must be >= 0 and below epochs \(3\), got 3"):
        rates_seen(optimizer, epochs=3, warmup_epochs=3)


@pytest.mark.parametrize("stop", [StopTraining, RuntimeError])
def test_fit_gives_the_base_rate_back_when_training_stops_or_fails(stop):
    optimizer = make_optimizer("adam", 0.01)

    def stop_at_step_3(event):
        if isinstance(event, StepEvent) and event.step == 3:
            raise stop("stop")

    x, y = small_problem()
    model = build_model(MLP_SPEC).initialise(0)
    failing = pytest.raises(RuntimeError) if stop is RuntimeError else contextlib.nullcontext()
    with failing:
        history = fit(
            model,
            optimizer,
            x,
            y,
            epochs=2,
            batch_size=32,
            seed=0,
            lr_schedule="cosine",
            warmup_epochs=1,
            callback=stop_at_step_3,
        )
        assert history.stop_reason == "stopped" and history.steps == 3
    assert optimizer.lr == 0.01


def test_a_run_resumed_mid_warm_up_ends_bit_identical():
    x, y = small_problem()
    settings: dict[str, Any] = dict(epochs=3, batch_size=32, seed=4, lr_schedule="cosine", warmup_epochs=1.5)
    unbroken = build_model(MLP_SPEC).initialise(0)
    fit(unbroken, make_optimizer("nesterov", 0.05), x, y, **settings)

    optimizer, saved = make_optimizer("nesterov", 0.05), {}

    def stop_after_step_5(event):  # inside the 12 warm-up steps
        if isinstance(event, StepEvent) and event.step == 5:
            saved.update(safetensors.numpy.load(safetensors.numpy.save(optimizer.state_dict())))
            raise StopTraining

    interrupted = build_model(MLP_SPEC).initialise(0)
    fit(interrupted, optimizer, x, y, callback=stop_after_step_5, **settings)
    resumed = make_optimizer("nesterov", 0.05).load_state_dict(saved, interrupted.state_dict())
    fit(interrupted, resumed, x, y, start_step=5, **settings)
    assert weights_bytes(interrupted) == weights_bytes(unbroken)
    no_warm_up = build_model(MLP_SPEC).initialise(0)
    fit(no_warm_up, make_optimizer("nesterov", 0.05), x, y, **{**settings, "warmup_epochs": 0})
    assert weights_bytes(no_warm_up) != weights_bytes(unbroken)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(warmup_epochs=-0.5), "warmup_epochs must be >= 0 and below epochs (10), got -0.5"),
        (dict(warmup_epochs=math.nan), "warmup_epochs must be >= 0"),
        (dict(warmup_epochs=math.inf), "warmup_epochs must be >= 0"),
        (dict(epochs=4, warmup_epochs=4), "warmup_epochs must be >= 0 and below epochs (4), got 4"),
    ],
)
def test_bad_warm_up_names_the_field(settings, message):
    with pytest.raises(ValueError) as refused:
        Hyperparameters(**settings)
    assert message in str(refused.value)


def test_the_cli_flags_set_the_new_settings():
    parser = argparse.ArgumentParser()
    add_hyperparameter_flags(parser)
    args = parser.parse_args(["--warmup-epochs", "0.5", "--augment-shift", "2", "--augment-flip", "on"])
    given = {k: v for k, v in given_hyperparameters(args).items() if v is not None}
    assert given == {"warmup_epochs": 0.5, "augment_shift": 2, "augment_flip": True}
    assert Hyperparameters(**given).augmentation().flip is True
    assert parser.parse_args(["--augment-flip", "off"]).augment_flip is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--augment-flip", "maybe"])


def test_new_settings_keep_their_defaults_off():
    hp = Hyperparameters()
    assert (hp.warmup_epochs, hp.augment_shift, hp.augment_flip) == (0.0, 0, False)
