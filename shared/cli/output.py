"""What `tandem` prints about jobs, checkpoints, datasets and accuracy: tables, local times,
one-line texts."""

from __future__ import annotations

from datetime import UTC

from google.protobuf.timestamp_pb2 import Timestamp

from shared.rpc.convert import job_state_name
from shared.rpc.stubs import tandem_common_pb2
from shared.rpc.stubs import tandem_trainer_pb2 as pb


def print_table(headers: list[str], rows: list[list]) -> None:
    """Columns as wide as their widest cell, two spaces apart; no trailing spaces."""
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def print_jobs(jobs: list[pb.Job]) -> None:
    """A table of Job messages, a row per job."""
    print_table(
        ["JOB", "STATE", "MODEL", "DATASET", "EPOCH", "TEST ACC", "VERSION", "CREATED"],
        [
            [
                job.job_id,
                job_state_name(job.state),
                job.model_name,
                job.request.dataset,
                f"{job.progress.epoch}/{job.progress.epochs}",
                f"{job.last_metrics.test_accuracy:.2%}" if job.HasField("last_metrics") else "-",
                job.last_published_version or "-",
                local_time(job.created_at),
            ]
            for job in jobs
        ],
    )


def print_checkpoints(checkpoints: list[tandem_common_pb2.CheckpointInfo]) -> None:
    """A table of CheckpointInfo messages; the latest version is marked with `*`."""
    print_table(
        ["VERSION", "EPOCH", "STEP", "TEST ACC", "SIZE", "CREATED"],
        [
            [
                f"{c.version}{' *' if c.latest else ''}",
                c.epoch,
                c.step,
                f"{c.metrics['test_accuracy']:.2%}" if "test_accuracy" in c.metrics else "-",
                f"{c.size_bytes / 1024:.1f} KiB",
                local_time(c.created_at),
            ]
            for c in checkpoints
        ],
    )


def print_datasets(datasets: list[pb.DatasetInfo]) -> None:
    """A table of DatasetInfo messages, a row per dataset."""
    print_table(
        ["DATASET", "SOURCE", "SAMPLE SHAPE", "CLASSES", "TRAIN", "TEST"],
        [[d.name, d.source, list(d.input_shape), d.num_classes, d.train_size, d.test_size] for d in datasets],
    )


def local_time(stamp: Timestamp) -> str:
    """A protobuf Timestamp in the local time zone, to the second."""
    return stamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def checkpoint_text(checkpoint: tandem_common_pb2.CheckpointInfo) -> str:
    """`digits version 3 (epoch 3, step 153, test accuracy 97.77%)`.

    A checkpoint taken mid-epoch (`--every-steps`) carries the metrics of the last
    finished epoch, which are not of its weights: then the accuracy says its epoch,
    `(epoch 3, step 140, test accuracy 97.21% at the end of epoch 2)`.
    """
    details = [f"epoch {checkpoint.epoch}", f"step {checkpoint.step}"]
    metrics = checkpoint.metrics
    if "test_accuracy" in metrics:
        accuracy = f"test accuracy {metrics['test_accuracy']:.2%}"
        if metrics.get("epoch", checkpoint.epoch) != checkpoint.epoch:
            accuracy += f" at the end of epoch {int(metrics['epoch'])}"
        details.append(accuracy)
    return f"{checkpoint.model_name} version {checkpoint.version} ({', '.join(details)})"


def job_end_text(job: pb.Job) -> str:
    """`job 1f2e…: SUCCEEDED (completed), test accuracy 98.88% after epoch 15, latest version 15`."""
    text = f"job {job.job_id}: {job_state_name(job.state)}"
    if job.stop_reason:
        text += f" ({job.stop_reason})"
    if job.error:
        text += f": {job.error}"
    if job.HasField("last_metrics"):
        text += f", test accuracy {job.last_metrics.test_accuracy:.2%} after epoch {job.last_metrics.epoch}"
    if job.last_published_version:
        text += f", latest version {job.last_published_version}"
    return text


def accuracy_text(correct: int, total: int) -> str:
    """`97.77% (175/179)`."""
    return f"{correct / total:.2%} ({correct}/{total})"
