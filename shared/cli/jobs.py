"""`tandem jobs ...`: training jobs on a trainer service (--trainer), and how a watch is shown.

start        queue a job (--follow: then watch it)
list         the jobs, newest first
watch        follow a job to its end: `watch_job`, which `make demo` shows too
cancel       stop a job
checkpoints  a model's published versions
plot         a job's loss and accuracy per epoch, as an image (matplotlib: tandem[plot])
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from shared.cli.errors import EXIT_JOB_UNSUCCESSFUL, report
from shared.cli.flags import (
    add_architecture_flags,
    add_hyperparameter_flags,
    connection,
    connection_flags,
    given_hyperparameters,
    positive_int,
    read_spec_file,
)
from shared.cli.output import checkpoint_text, job_end_text, print_checkpoints, print_jobs
from shared.cli.progress import TerminalProgress
from shared.client import TrainerClient
from shared.nn import EpochEvent, StepEvent
from shared.rpc.convert import JOB_STATE_NAMES, job_state_name
from shared.rpc.stubs import tandem_trainer_pb2 as pb

DEFAULT_TRAINER = "127.0.0.1:50051"  # where `python -m trainer_svc` listens by default


def add_jobs(commands: argparse._SubParsersAction) -> None:
    """`tandem jobs` and its commands, each with the connection flags and --trainer."""
    jobs = commands.add_parser(
        "jobs", help="train on a trainer service: start, follow, list and cancel jobs"
    ).add_subparsers(title="jobs commands", required=True, metavar="COMMAND")
    trainer = argparse.ArgumentParser(add_help=False, parents=[connection_flags()])
    trainer.add_argument(
        "--trainer",
        metavar="HOST:PORT",
        default=os.environ.get("TANDEM_TRAINER", DEFAULT_TRAINER),
        help=f"the trainer's address (default: $TANDEM_TRAINER, else {DEFAULT_TRAINER})",
    )

    add_start(jobs.add_parser("start", parents=[trainer], help="queue a training job"))
    add_list(jobs.add_parser("list", parents=[trainer], help="list the jobs, newest first"))
    watch = jobs.add_parser(
        "watch", parents=[trainer], help="follow a job to its end (exit code 0 if it SUCCEEDED, 1 if not)"
    )
    watch.add_argument("job_id", metavar="JOB_ID")
    watch.set_defaults(run=run_watch)
    cancel = jobs.add_parser("cancel", parents=[trainer], help="stop a job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.set_defaults(run=run_cancel)
    checkpoints = jobs.add_parser("checkpoints", parents=[trainer], help="list a model's published versions")
    checkpoints.add_argument("model_name", metavar="MODEL_NAME")
    checkpoints.set_defaults(run=run_checkpoints)
    plot = jobs.add_parser(
        "plot",
        parents=[trainer],
        help="plot a job's loss and accuracy per epoch (needs matplotlib: tandem[plot])",
    )
    plot.add_argument("job_id", metavar="JOB_ID")
    plot.add_argument("--out", required=True, metavar="FILE.png", help="the image to write")
    plot.set_defaults(run=run_plot)


def trainer_client(args: argparse.Namespace) -> TrainerClient:
    """A client of the trainer at --trainer, connected as the connection flags say."""
    return TrainerClient(args.trainer, connection=connection(args))


# ---------------------------------------------------------------- start, list


def add_start(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-name", required=True, metavar="NAME", help="the name its checkpoints are published under"
    )
    add_architecture_flags(parser)
    parser.add_argument(
        "--dataset", required=True, metavar="NAME", help="a dataset the trainer has (see its ListDatasets)"
    )
    add_hyperparameter_flags(parser)
    schedule = parser.add_argument_group(
        "checkpoints", "The final checkpoint is always published; these add intermediate ones."
    )
    schedule.add_argument(
        "--every-steps",
        type=int,
        default=0,
        metavar="N",
        help="publish every N optimiser steps (default: 0, not by steps)",
    )
    schedule.add_argument(
        "--no-every-epoch",
        dest="every_epoch",
        action="store_false",
        help="do not publish at the end of every epoch",
    )
    parser.add_argument(
        "--resume-from-version",
        type=positive_int,
        metavar="V",
        help="start from this published version of the model",
    )
    parser.add_argument(
        "--follow", action="store_true", help="then watch it to its end, as `tandem jobs watch`"
    )
    parser.set_defaults(run=run_start)


def run_start(args: argparse.Namespace) -> int | None:
    with trainer_client(args) as trainer:
        job = trainer.start_job(
            args.model_name,
            args.dataset,
            preset=args.preset,
            spec=read_spec_file(args.spec) if args.spec else None,
            hidden=args.hidden or (),
            hyperparameters=given_hyperparameters(args),
            every_steps=args.every_steps,
            every_epoch=args.every_epoch,
            resume_from_version=args.resume_from_version,
        )
        print(f"started job {job.job_id} ({job_state_name(job.state)})")
        if args.follow:
            return watch_exit_code(watch_job(trainer, job.job_id))
    return None


def add_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        action="append",
        default=[],
        type=str.upper,
        choices=JOB_STATE_NAMES,
        metavar="STATE",
        help="only jobs in this state (repeatable): " + ", ".join(JOB_STATE_NAMES),
    )
    parser.add_argument("--model-name", default="", metavar="NAME", help="only jobs publishing to this model")
    parser.set_defaults(run=run_list)


def run_list(args: argparse.Namespace) -> None:
    with trainer_client(args) as trainer:
        jobs = trainer.list_jobs(states=args.state, model_name=args.model_name)
    if jobs:
        print_jobs(jobs)
    else:
        print("no jobs")


# ---------------------------------------------------------------- watch, cancel, checkpoints


def run_watch(args: argparse.Namespace) -> int:
    with trainer_client(args) as trainer:
        return watch_exit_code(watch_job(trainer, args.job_id))


def run_cancel(args: argparse.Namespace) -> None:
    with trainer_client(args) as trainer:
        job = trainer.cancel(args.job_id)
    print(f"job {job.job_id}: {job_state_name(job.state)}")


def run_checkpoints(args: argparse.Namespace) -> None:
    with trainer_client(args) as trainer:
        print_checkpoints(trainer.list_checkpoints(args.model_name))


def watch_job(
    trainer: TrainerClient, job_id: str, on_checkpoint: Callable[[pb.JobEvent], None] | None = None
) -> pb.Job:
    """Show a job's progress until it ends; return it as it ended.

    What has happened so far first (its state, its finished epochs), then
    the progress bar and a line per epoch (TerminalProgress: on a terminal;
    plain lines elsewhere), a line per published checkpoint and per change
    of state, and the final state. `on_checkpoint` is called with each
    checkpoint event, after its line (the watch waits for it).
    """
    progress = None
    try:
        for event in trainer.watch(job_id):
            kind = event.WhichOneof("event")
            if progress is None:  # the first event: the job's snapshot
                job = event.snapshot
                print(
                    f"job {job.job_id}: {job.model_name} on {job.request.dataset}, "
                    f"{job.progress.epochs} epochs: {job_state_name(job.state)}"
                )
                progress = TerminalProgress(job.progress.epochs)
                for epoch in job.history:
                    progress(epoch_event(epoch))
            elif kind == "step":
                step = event.step
                progress(
                    StepEvent(
                        step.epoch, step.step, step.steps_per_epoch, step.batch_loss, step.batch_accuracy
                    )
                )
            elif kind == "epoch":
                progress(epoch_event(event.epoch))
            else:
                progress.close()  # clears the status line for the line below
                if kind == "snapshot":
                    print(f"job {job_id}: {job_state_name(event.snapshot.state)}")
                elif kind == "checkpoint":
                    print(f"published {checkpoint_text(event.checkpoint)}")
                    if on_checkpoint is not None:
                        on_checkpoint(event)
                else:
                    print(job_end_text(event.finished))
                    return event.finished
    finally:
        if progress is not None:
            progress.close()
    raise ConnectionError(f"the trainer ended the watch of job {job_id} before the job ended")


def watch_exit_code(job: pb.Job) -> int:
    return 0 if job.state == pb.JOB_STATE_SUCCEEDED else EXIT_JOB_UNSUCCESSFUL


def metrics_dict(epoch: pb.EpochMetrics) -> dict[str, float]:
    """An epoch's metrics by the training loop's names; val_* only when the job has them."""
    return {
        field.name: getattr(epoch, field.name)
        for field in epoch.DESCRIPTOR.fields
        if not field.has_presence or epoch.HasField(field.name)
    }


def epoch_event(epoch: pb.EpochMetrics) -> EpochEvent:
    return EpochEvent(epoch.epoch, epoch.step, metrics_dict(epoch))


# ---------------------------------------------------------------- plot


def run_plot(args: argparse.Namespace) -> int | None:
    try:
        from matplotlib.figure import Figure  # an optional extra
    except ImportError:
        return report("`tandem jobs plot` needs matplotlib: pip install 'tandem[plot]'")
    with trainer_client(args) as trainer:
        job = trainer.get_job(args.job_id)
    if not job.history:
        raise ValueError(f"job {job.job_id} has no finished epoch to plot yet")
    history = [metrics_dict(epoch) for epoch in job.history]
    epochs = [metrics["epoch"] for metrics in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    figure.suptitle(f"job {job.job_id}: {job.model_name} on {job.request.dataset}")
    for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split in ("train", "val", "test"):
            if f"{split}_{metric}" in history[0]:
                axes.plot(epochs, [m[f"{split}_{metric}"] for m in history], marker="o", label=split)
        axes.set(title=metric, xlabel="epoch")
        axes.legend()
    figure.savefig(args.out)
    print(f"wrote {args.out}")
    return None
