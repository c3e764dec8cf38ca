"""`tandem jobs plot`'s figure: a job's loss and accuracy per epoch (needs matplotlib).

Two panels side by side, loss and accuracy in percent, a line per split the
job has (train, val, test) over whole-numbered epochs; the title says the job,
the model, the dataset and the final test accuracy, the footer the main
hyperparameters. 16 x 6 inches at 100 dpi: 1600 x 600 pixels.

Drawn on a matplotlib.figure.Figure of its own (Agg, the backend a Figure
saves with by default) rather than pyplot's global state: nothing here opens a
window or needs a display.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from shared.rpc.stubs import tandem_trainer_pb2 as pb

SIZE_INCHES = (16, 6)
DPI = 100
SPLITS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
MARKERS_UP_TO = 30  # epochs; with more, the markers would hide the lines


def history_figure(job: pb.Job, history: list[dict[str, float]]) -> Figure:
    """The figure of a job's finished epochs (`history`: each epoch's metrics by name)."""
    epochs = [int(metrics["epoch"]) for metrics in history]
    figure = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    last = history[-1]
    figure.suptitle(
        f"job {job.job_id}: {job.model_name} on {job.request.dataset}, "
        f"final test accuracy {last['test_accuracy']:.2%} (epoch {epochs[-1]})",
        fontsize="x-large",
    )
    loss, accuracy = figure.subplots(1, 2)
    marker = "o" if len(epochs) <= MARKERS_UP_TO else None
    for split, color in SPLITS.items():
        if f"{split}_loss" not in last:
            continue
        loss.plot(epochs, [m[f"{split}_loss"] for m in history], marker=marker, color=color, label=split)
        percents = [100 * m[f"{split}_accuracy"] for m in history]
        accuracy.plot(epochs, percents, marker=marker, color=color, label=split)
    loss.set(title="loss", ylabel="cross-entropy loss")
    accuracy.set(title="accuracy", ylabel="accuracy (%)")
    accuracy.yaxis.set_major_formatter(PercentFormatter(xmax=100))
    for axes in (loss, accuracy):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
        axes.legend()
    # The footer, as the figure's x label: the constrained layout makes room for it.
    figure.supxlabel(settings_text(job), color="dimgray")
    return figure


def settings_text(job: pb.Job) -> str:
    """`preset digits-cnn, optimizer adam, lr 0.001 (constant), batch size 32, 15 epochs, seed 0`."""
    hp = job.hyperparameters
    architecture = f"preset {job.request.preset}" if job.request.preset else "a spec file"
    if job.request.hidden:
        architecture += f" (hidden {','.join(map(str, job.request.hidden))})"
    parts = [
        architecture,
        f"optimizer {hp.optimizer}",
        f"lr {hp.learning_rate:g} ({hp.lr_schedule})",
        f"batch size {hp.batch_size}",
        f"{hp.epochs} epochs",
        f"seed {hp.seed}",
    ]
    if hp.validation_split:
        parts.append(f"validation split {hp.validation_split:g}")
    return ", ".join(parts)
