"""`tandem`'s progress for people: a live status line, redrawn in place on a terminal.

`TerminalProgress` is a callback for `shared.nn.fit` (through `shared.nn.run`).
On a terminal it redraws one status line in place with `\\r`,

    epoch 3/15 [#########.........] 120/506  loss 0.1234  acc 96.5%

at most ~10 times a second, however fast the steps come, and replaces it by
the epoch's summary line when the epoch ends. Anywhere else (a pipe, a log
file, CI) it writes only the summary lines, so logs hold no `\\r` noise.

It need not see every step: the bar follows the steps' numbers, and loss and
accuracy are the means over the steps it was shown, so it also draws the
thinned-out step events of a job watched on the trainer (`tandem jobs watch`).

`UploadProgress` draws the bytes of an upload the same way (`tandem jobs
upload`): `uploading fashion [####..............] 12.0/52.3 MiB`, then one
line, `sent 52.3 MiB`, on a terminal or not. Both are `StatusLine`s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from shared.nn import EpochEvent, StepEvent

BAR_WIDTH = 18
REDRAW_INTERVAL = 0.1  # seconds


def format_epoch(metrics: dict[str, float], total_epochs: int) -> str:
    """`epoch  3/15  train loss 0.1234 acc 96.54%  [val …]  test loss … acc …  (1.2 s)`."""
    width = len(str(total_epochs))
    parts = [f"epoch {metrics['epoch']:>{width}}/{total_epochs}"]
    for split in ("train", "val", "test"):
        if f"{split}_loss" in metrics:
            parts.append(
                f"{split} loss {metrics[f'{split}_loss']:.4f} acc {metrics[f'{split}_accuracy']:.2%}"
            )
    parts.append(f"({metrics['seconds']:.1f} s)")
    return "  ".join(parts)


class StatusLine:
    """One line redrawn in place on a terminal (at most every `interval` seconds unless told),
    cleared before anything else is written; on anything else, never drawn."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = REDRAW_INTERVAL,
    ):
        self.stream = stream if stream is not None else sys.stdout
        self.live = self.stream.isatty()
        self.clock = clock
        self.interval = interval
        self._last_draw: float | None = None
        self._shown = 0  # length of the status line on screen; 0 when none is

    def close(self) -> None:
        """Clear the status line, so that what is printed next starts on a clean line."""
        self._clear()

    def _draw_if_due(self, line: Callable[[], str], always: bool = False) -> None:
        """Draw `line()` if `interval` has passed since the last draw (or `always`)."""
        now = self.clock()
        if always or self._last_draw is None or now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw(line())

    def _draw(self, line: str) -> None:
        # Pad with spaces to overwrite a longer line drawn before.
        self._write("\r" + line.ljust(self._shown))
        self._shown = len(line)

    def _clear(self) -> None:
        if self._shown:
            self._write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def bar(done: int, total: int) -> str:
    """`[#########.........]`: `done` of `total`, BAR_WIDTH characters wide."""
    filled = BAR_WIDTH * done // total if total else BAR_WIDTH
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


class TerminalProgress(StatusLine):
    """Call it with each StepEvent and EpochEvent; `close()` when training ends or fails."""

    def __init__(
        self,
        total_epochs: int,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = REDRAW_INTERVAL,
    ):
        super().__init__(stream, clock=clock, interval=interval)
        self.total_epochs = total_epochs
        # The epoch being run, and running means over the steps of it shown so far.
        self._epoch = 0
        self._shown_steps = 0
        self._loss_sum = 0.0
        self._accuracy_sum = 0.0

    def __call__(self, event: StepEvent | EpochEvent) -> None:
        if isinstance(event, EpochEvent):
            self._clear()
            self._write(format_epoch(event.metrics, self.total_epochs) + "\n")
        elif self.live:
            self._step(event)

    def _step(self, event: StepEvent) -> None:
        if event.epoch != self._epoch:
            self._epoch, self._shown_steps = event.epoch, 0
            self._loss_sum = self._accuracy_sum = 0.0
        self._shown_steps += 1
        self._loss_sum += event.batch_loss
        self._accuracy_sum += event.batch_accuracy
        step_in_epoch = event.step - (event.epoch - 1) * event.steps_per_epoch
        # The epoch's last step is always drawn: the full bar stays up while the
        # epoch's validation and test metrics are computed.
        self._draw_if_due(
            lambda: (
                f"epoch {self._epoch}/{self.total_epochs} {bar(step_in_epoch, event.steps_per_epoch)} "
                f"{step_in_epoch}/{event.steps_per_epoch}"
                f"  loss {self._loss_sum / self._shown_steps:.4f}"
                f"  acc {self._accuracy_sum / self._shown_steps:.1%}"
            ),
            always=step_in_epoch == event.steps_per_epoch,
        )


class UploadProgress(StatusLine):
    """Call it with (bytes sent, bytes in all) as an upload goes; `finish()` once it is sent."""

    def __init__(self, name: str, stream: TextIO | None = None, **timing):
        super().__init__(stream, **timing)
        self.name = name
        self.total = 0

    def __call__(self, sent: int, total: int) -> None:
        self.total = total
        if self.live:
            self._draw_if_due(
                lambda: f"uploading {self.name} {bar(sent, total)} {mebibytes(sent)}/{mebibytes(total)} MiB",
                always=sent == total,
            )

    def finish(self) -> None:
        """Replace the bar by `sent 52.3 MiB`."""
        self._clear()
        self._write(f"sent {mebibytes(self.total)} MiB\n")


def mebibytes(size: int) -> str:
    return f"{size / 2**20:.1f}"
