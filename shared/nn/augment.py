"""Image augmentation for training: each sample shifted at random, and mirrored if asked.

A training setting (Hyperparameters.augment_shift and augment_flip) that
`fit` applies to every training minibatch, never to validation, test or
inference data. Each image moves by (dy, dx), each drawn uniformly from
[-shift, shift], and the pixels it leaves are zeros: torchvision's
RandomCrop(size, padding=shift) with fill 0. With `flip`, it is also mirrored
left-right with probability 1/2 (RandomHorizontalFlip). Flips are off by
default: a mirrored digit is another glyph, or none.

The draws for a step come from a generator seeded by the run's seed and the
step's number, not from one generator carried from step to step: a run
resumed at step s (fit's start_step) draws for step s what the unbroken run
drew there, so runs stay bit-identical per seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# SeedSequence(seed, spawn_key=(AUGMENTATION_STREAM, step)) seeds a step's draws. The spawn key
# keeps them apart from the other draws of a seed: the initial weights (default_rng(seed)) and
# the shuffling (default_rng([seed, epoch])) have none.
AUGMENTATION_STREAM = 1


@dataclass(frozen=True)
class Augmentation:
    shift: int = 0  # pixels; 0 = no shifts
    flip: bool = False

    def __post_init__(self):
        if not isinstance(self.shift, int) or isinstance(self.shift, bool) or self.shift < 0:
            raise ValueError(f"augment_shift must be an int >= 0 (pixels), got {self.shift!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"augment_flip must be true or false, got {self.flip!r}")

    @property
    def active(self) -> bool:
        return bool(self.shift or self.flip)

    def check(self, sample_shape: tuple[int, ...]) -> None:
        """Refuse (ValueError, naming the setting) what samples of `sample_shape` cannot take:
        augmentation of anything but images [C, H, W], a shift of the whole height or width."""
        if not self.active:
            return
        if len(sample_shape) != 3:
            setting = "augment_shift" if self.shift else "augment_flip"
            raise ValueError(
                f"{setting} augments images [channels, height, width]; "
                f"these samples have shape {list(sample_shape)}"
            )
        if self.shift >= min(sample_shape[1:]):
            raise ValueError(
                f"augment_shift must be below the images' height and width "
                f"{list(sample_shape[1:])}, got {self.shift}"
            )

    def apply(self, batch: np.ndarray, seed: int, step: int) -> np.ndarray:
        """`batch` (n, c, h, w) augmented for 0-based training `step` of a run seeded `seed`.

        A new array of the batch's dtype; `batch` itself when there is nothing to do.
        """
        if not self.active:
            return batch
        n, channels, h, w = batch.shape
        k = self.shift
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(AUGMENTATION_STREAM, step)))
        dy, dx = rng.integers(-k, k + 1, size=(2, n)) if k else np.zeros((2, n), dtype=np.int64)
        flipped = np.less(rng.random(n), 0.5) if self.flip else np.zeros(n, dtype=bool)
        # out[i, j] = image[i - dy, j - dx], zero outside the image, then mirrored (j -> w - 1 - j):
        # one gather from the image padded by k zeros on each side, for the whole batch.
        padded = np.pad(batch, ((0, 0), (0, 0), (k, k), (k, k)))
        rows = np.arange(h) + k - dy[:, None]  # (n, h)
        columns = np.where(flipped[:, None], np.arange(w)[::-1], np.arange(w)) + k - dx[:, None]  # (n, w)
        return padded[
            np.arange(n)[:, None, None, None],
            np.arange(channels)[None, :, None, None],
            rows[:, None, :, None],
            columns[:, None, None, :],
        ]
