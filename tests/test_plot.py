"""`tandem jobs plot` (shared/cli/plot.py): the figure of a real job, read back from the Figure and
from the PNG it saves, against a real trainer on 127.0.0.1 (tests/conftest.py's `trainer`)."""

import struct
import uuid

import numpy as np
import pytest
from matplotlib.ticker import PercentFormatter  # in the dev lock: pip install -e '.[plot]'

from shared.cli import main
from shared.cli.jobs import metrics_dict
from shared.cli.plot import history_figure
from shared.client import TrainerClient

EPOCHS = 4


@pytest.fixture(scope="module")
def finished_job(idle_trainer):
    """A small job (mlp: cosine schedule, batch 64; 16 hidden units, a validation split) run to its
    end; (trainer address, Job)."""
    address = f"127.0.0.1:{idle_trainer.server.port}"
    with TrainerClient(address) as client:
        job = client.start_job(
            f"plot-{uuid.uuid4().hex[:8]}",
            "digits",
            preset="mlp",
            hidden=[16],
            hyperparameters={"epochs": EPOCHS, "validation_split": 0.1, "learning_rate": 0.003},
        )
        *_, last = client.watch(job.job_id)
    return address, last.finished


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which follows its 8-byte signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_a_png_of_at_least_1600_by_600(finished_job, tmp_path, capsys):
    address, job = finished_job
    image = tmp_path / "history.png"
    assert main(["jobs", "plot", job.job_id, "--trainer", address, "--out", str(image)]) == 0
    assert capsys.readouterr() == (f"wrote {image}\n", "")
    width, height = png_size(image)
    assert width >= 1600 and height >= 600


def test_the_figure_has_labelled_axes_percent_integer_epochs_a_grid_and_the_settings(finished_job):
    _, job = finished_job
    figure = history_figure(job, [metrics_dict(epoch) for epoch in job.history])
    loss, accuracy = figure.axes
    assert [axes.get_ylabel() for axes in (loss, accuracy)] == ["cross-entropy loss", "accuracy (%)"]
    assert [axes.get_xlabel() for axes in (loss, accuracy)] == ["epoch", "epoch"]
    for axes in (loss, accuracy):
        assert [line.get_label() for line in axes.get_lines()] == ["train", "val", "test"]
        legend = axes.get_legend()
        assert legend is not None
        assert [label.get_text() for label in legend.get_texts()] == ["train", "val", "test"]
        assert all(tick == int(tick) for tick in axes.get_xticks())
        assert all(gridline.get_visible() for gridline in axes.get_xgridlines() + axes.get_ygridlines())

    # Accuracy is drawn in percent: the lines' values and the tick labels.
    test_line = accuracy.get_lines()[2]
    assert np.asarray(test_line.get_ydata()).tolist() == [100 * epoch.test_accuracy for epoch in job.history]
    assert isinstance(accuracy.yaxis.get_major_formatter(), PercentFormatter)
    assert np.asarray(test_line.get_xdata()).tolist() == list(range(1, EPOCHS + 1))

    final = f"{job.last_metrics.test_accuracy:.2%}"
    assert figure.get_suptitle() == (
        f"job {job.job_id}: {job.model_name} on digits, final test accuracy {final} (epoch {EPOCHS})"
    )
    assert figure.get_supxlabel() == (
        f"preset mlp (hidden 16), optimizer adam, lr 0.003 (cosine), batch size 64, {EPOCHS} epochs, "
        "seed 0, validation split 0.1"
    )
