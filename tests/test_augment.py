"""Image augmentation: random shifts with zeros filled in, optional flips, drawn per seed and step."""

import numpy as np
import pytest
import safetensors.numpy

from shared.data import load_dataset
from shared.nn import StepEvent, StopTraining, build_model, fit, make_optimizer
from shared.nn.augment import Augmentation
from shared.nn.presets import get_preset
from shared.nn.run import Hyperparameters, prepare_model, train
from tests.test_training import weights_bytes

H = W = 9


def one_hot_images(n: int, row: int, column: int) -> np.ndarray:
    images = np.zeros((n, 1, H, W), dtype=np.float32)
    images[:, 0, row, column] = 1
    return images


def where_the_pixel_went(augmented: np.ndarray) -> np.ndarray:
    """(n, 2): the row and column of each sample's one lit pixel."""
    assert (augmented.reshape(len(augmented), -1).sum(axis=1) == 1).all()  # moved, not lost or copied
    flat = augmented.reshape(len(augmented), -1).argmax(axis=1)
    return np.stack([flat // W, flat % W], axis=1)


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The definition: out[i, j] = image[i - dy, j - dx], zero where that is outside."""
    out = np.zeros_like(image)
    for i in range(H):
        for j in range(W):
            if 0 <= i - dy < H and 0 <= j - dx < W:
                out[:, i, j] = image[:, i - dy, j - dx]
    return out


def test_each_image_moves_by_its_drawn_shift_with_zeros_filled_in():
    n, augmentation = 400, Augmentation(shift=2)
    moved = where_the_pixel_went(augmentation.apply(one_hot_images(n, 4, 4), seed=3, step=7)) - 4
    assert np.abs(moved).max() == 2
    assert len({tuple(s) for s in moved}) == 25  # every (dy, dx) in [-2, 2]^2 is drawn
    # The draws depend on the seed, the step and the batch size, not on the pixels: the same
    # shifts move any image, and each lands where the definition puts it.
    images = np.random.default_rng(0).random((n, 1, H, W)).astype(np.float32)
    out = augmentation.apply(images, seed=3, step=7)
    assert out.dtype == np.float32 and out.shape == images.shape
    for image, result, (dy, dx) in zip(images[:20], out[:20], moved[:20], strict=True):
        np.testing.assert_array_equal(result, shifted(image, dy, dx))


def test_flips_mirror_about_half_the_images_left_right():
    out = Augmentation(flip=True).apply(one_hot_images(400, 4, 1), seed=0, step=0)
    columns = where_the_pixel_went(out)[:, 1]
    assert set(columns) == {1, W - 1 - 1}
    assert 150 < (columns == W - 2).sum() < 250
    # Shifts and flips together: the shift is drawn as without the flip, then the image mirrored.
    both = Augmentation(shift=1, flip=True).apply(one_hot_images(400, 4, 4), seed=0, step=0)
    shift_only = Augmentation(shift=1).apply(one_hot_images(400, 4, 4), seed=0, step=0)
    rows, cols = where_the_pixel_went(both).T
    rows_alone, cols_alone = where_the_pixel_went(shift_only).T
    assert (rows == rows_alone).all() and set(zip(cols, cols_alone, strict=True)) <= {
        (c, c_alone) for c_alone in range(3, 6) for c in (c_alone, W - 1 - c_alone)
    }


def test_draws_are_the_same_for_a_seed_and_step_and_differ_otherwise():
    images = np.random.default_rng(1).random((64, 1, H, W))
    augmentation = Augmentation(shift=2, flip=True)
    first = augmentation.apply(images, seed=5, step=10)
    assert first.tobytes() == augmentation.apply(images, seed=5, step=10).tobytes()
    assert first.tobytes() != augmentation.apply(images, seed=6, step=10).tobytes()
    assert first.tobytes() != augmentation.apply(images, seed=5, step=11).tobytes()


def test_no_shift_and_no_flip_leave_the_batch_untouched():
    images = np.random.default_rng(2).random((8, 1, H, W))
    assert Augmentation().apply(images, seed=0, step=0) is images
    assert not Augmentation().active


@pytest.mark.parametrize(
    "augmentation, shape, message",
    [
        (Augmentation(shift=1), (64,), "augment_shift augments images [channels, height, width]; "),
        (Augmentation(flip=True), (64,), "augment_flip augments images"),
        (Augmentation(shift=8), (1, 8, 12), r"augment_shift must be below the images' height and width"),
    ],
)
def test_augmentation_the_samples_cannot_take_is_refused_naming_the_setting(augmentation, shape, message):
    with pytest.raises(ValueError) as refused:
        augmentation.check(shape)
    assert message in str(refused.value)
    Augmentation().check(shape)  # off fits anything


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(augment_shift=-1), "augment_shift must be an int >= 0"),
        (dict(augment_shift=1.5), "augment_shift must be an int >= 0"),
        (dict(augment_flip="yes"), "augment_flip must be true or false"),
    ],
)
def test_bad_augmentation_hyperparameters_name_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        Hyperparameters(**settings)


def test_fit_refuses_augmenting_flat_samples():
    x = np.zeros((16, 64), dtype=np.float32)
    model = build_model({"input_shape": [64], "layers": [{"type": "dense", "units": 2}]}).initialise(0)
    with pytest.raises(ValueError, match="augment_shift augments images"):
        fit(
            model,
            make_optimizer("sgd", 0.1),
            x,
            np.zeros(16, int),
            epochs=1,
            batch_size=8,
            seed=0,
            augmentation=Augmentation(shift=1),
        )


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


DIGITS_MLP = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "flatten"},
        {"type": "dense", "units": 32},
        {"type": "relu"},
        {"type": "dense", "units": 10},
    ],
}


def digits_fit(digits, model, optimizer, **settings):
    return fit(
        model,
        optimizer,
        digits.x_train[:320],
        digits.y_train[:320],
        epochs=2,
        batch_size=32,
        seed=4,
        lr_schedule="cosine",
        **settings,
    )


def test_a_run_resumed_mid_epoch_draws_the_same_augmentations_and_ends_bit_identical(digits):
    augmentation = Augmentation(shift=1, flip=True)
    unbroken = build_model(DIGITS_MLP).initialise(0)
    digits_fit(digits, unbroken, make_optimizer("momentum", 0.05), augmentation=augmentation)
    plain = build_model(DIGITS_MLP).initialise(0)
    digits_fit(digits, plain, make_optimizer("momentum", 0.05))
    assert weights_bytes(plain) != weights_bytes(unbroken)  # augmentation did something

    optimizer, saved = make_optimizer("momentum", 0.05), {}

    def stop_after_step_13(event):
        if isinstance(event, StepEvent) and event.step == 13:
            saved.update(safetensors.numpy.load(safetensors.numpy.save(optimizer.state_dict())))
            raise StopTraining

    interrupted = build_model(DIGITS_MLP).initialise(0)
    digits_fit(digits, interrupted, optimizer, augmentation=augmentation, callback=stop_after_step_13)
    resumed = make_optimizer("momentum", 0.05).load_state_dict(saved, interrupted.state_dict())
    digits_fit(digits, interrupted, resumed, augmentation=augmentation, start_step=13)
    assert weights_bytes(interrupted) == weights_bytes(unbroken)


def test_shift_zero_and_flip_off_train_exactly_as_without_augmentation(digits):
    a, b = build_model(DIGITS_MLP).initialise(0), build_model(DIGITS_MLP).initialise(0)
    digits_fit(digits, a, make_optimizer("adam", 1e-2), augmentation=Augmentation())
    digits_fit(digits, b, make_optimizer("adam", 1e-2))
    assert weights_bytes(a) == weights_bytes(b)


def test_training_with_shifts_still_learns_digits(digits):
    spec = get_preset("mlp").spec(digits.input_shape, digits.num_classes, hidden=(64,))
    hp = Hyperparameters(epochs=15, batch_size=32, learning_rate=3e-3, augment_shift=1, seed=0)
    trained = train(spec, digits, hp)
    assert trained.history.epochs[-1]["test_accuracy"] > 0.9, trained.history.epochs[-1]
    with pytest.raises(ValueError, match="augment_shift must be below the images' height and width"):
        prepare_model(spec, digits, Hyperparameters(augment_shift=8))
