"""`tandem jobs ...`: training jobs on a trainer service (--trainer), and how a watch is shown.

start        queue a job (--follow: then watch it)
list         the jobs, newest first
watch        follow a job to its end: `watch_job`, which `make demo` shows too
cancel       stop a job
checkpoints  a model's published versions
datasets     the datasets the trainer has
upload       send it a dataset: an .npz file or an MNIST-style set of IDX files (uploads.py)
plot         a job's loss and accuracy per epoch, as an image (plot.py; needs matplotlib)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import grpc

from shared.cli.errors import EXIT_INTERRUPTED, EXIT_JOB_UNSUCCESSFUL, report
from shared.cli.flags import (
    add_architecture_flags,
    add_dataset_flag,
    add_hyperparameter_flags,
    connection,
    connection_flags,
    given_hyperparameters,
    hyperparameters,
    positive_int,
    read_spec_file,
)
from shared.cli.output import (
    checkpoint_text,
    job_end_text,
    print_checkpoints,
    print_datasets,
    print_jobs,
)
from shared.cli.progress import TerminalProgress, UploadProgress
from shared.cli.uploads import read_dataset_files
from shared.client import TrainerClient
from shared.nn import EpochEvent, StepEvent
from shared.rpc.convert import JOB_STATE_NAMES, job_state_name
from shared.rpc.stubs import tandem_trainer_pb2 as pb

DEFAULT_TRAINER = "127.0.0.1:50051"  # where `python -m trainer_svc` listens by default


def add_jobs(commands: argparse._SubParsersAction) -> None:
    """`tandem jobs` and its commands, each with the connection flags and --trainer."""
    jobs = commands.add_parser(
        "jobs", help="train on a trainer service: its jobs, their checkpoints, its datasets"
    ).add_subparsers(
        title="jobs commands",
        required=True,
        metavar="COMMAND",
        help="`tandem jobs COMMAND --help` for its flags",
    )
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
    add_job_id(watch, "the job to follow (`tandem jobs list` shows them)")
    watch.set_defaults(run=run_watch)
    cancel = jobs.add_parser("cancel", parents=[trainer], help="stop a job")
    add_job_id(cancel, "the job to stop")
    cancel.set_defaults(run=run_cancel)
    checkpoints = jobs.add_parser("checkpoints", parents=[trainer], help="list a model's published versions")
    checkpoints.add_argument(
        "model_name", metavar="MODEL_NAME", help="the model (a job's --model-name) whose versions to list"
    )
    checkpoints.set_defaults(run=run_checkpoints)
    datasets = jobs.add_parser("datasets", parents=[trainer], help="list the datasets the trainer has")
    datasets.set_defaults(run=run_datasets)
    add_upload(jobs.add_parser("upload", parents=[trainer], help="send the trainer a dataset"))
    plot = jobs.add_parser(
        "plot",
        parents=[trainer],
        help="plot a job's loss and accuracy per epoch (needs matplotlib)",
    )
    add_job_id(plot, "the job whose finished epochs to plot")
    plot.add_argument("--out", required=True, metavar="FILE.png", help="the image to write")
    plot.set_defaults(run=run_plot)


def add_job_id(parser: argparse.ArgumentParser, help_: str) -> None:
    parser.add_argument("job_id", metavar="JOB_ID", help=help_)


def trainer_client(args: argparse.Namespace) -> TrainerClient:
    """A client of the trainer at --trainer, connected as the connection flags say."""
    return TrainerClient(args.trainer, connection=connection(args))


# ---------------------------------------------------------------- start, list


def add_start(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-name", required=True, metavar="NAME", help="the name its checkpoints are published under"
    )
    add_architecture_flags(parser)
    add_dataset_flag(parser, "a dataset the trainer has (see `tandem jobs datasets`)")
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
    hyperparameters(args)  # checked here too, so that a bad setting is told by its flag, not its field
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
            return follow(trainer, job.job_id)
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
        return follow(trainer, args.job_id)


def follow(trainer: TrainerClient, job_id: str) -> int:
    """Watch the job to its end: exit code 0 if it SUCCEEDED, else 1. Ctrl-C stops the
    watch, not the job, and says so (130)."""
    try:
        return watch_exit_code(watch_job(trainer, job_id))
    except KeyboardInterrupt:
        print(
            f"tandem: stopped watching; job {job_id} keeps running on the trainer "
            f"(`tandem jobs watch {job_id}` to follow it again, `tandem jobs cancel {job_id}` to stop it)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def run_cancel(args: argparse.Namespace) -> None:
    with trainer_client(args) as trainer:
        job = trainer.cancel(args.job_id)
    print(f"job {job.job_id}: {job_state_name(job.state)}")


def run_checkpoints(args: argparse.Namespace) -> None:
    with trainer_client(args) as trainer:
        print_checkpoints(trainer.list_checkpoints(args.model_name))


# ---------------------------------------------------------------- datasets, upload


def run_datasets(args: argparse.Namespace) -> None:
    with trainer_client(args) as trainer:
        print_datasets(trainer.list_datasets())


def add_upload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", metavar="NAME", help="the dataset's name on the trainer (what a job's --dataset gives)"
    )
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="an .npz file (arrays x_train, y_train, x_test, y_test, or x and y), or the four IDX "
        "files of an MNIST-style dataset (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each may be .gz) or their directory",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an uploaded dataset of that name")
    parser.set_defaults(run=run_upload)


def run_upload(args: argparse.Namespace) -> None:
    arrays = read_dataset_files(args.files)
    progress = UploadProgress(args.name)
    with trainer_client(args) as trainer:
        try:
            info = trainer.upload_dataset(args.name, arrays, overwrite=args.overwrite, on_progress=progress)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            # The trainer names the request's field (header.overwrite); the user knows the flag.
            raise FileExistsError(
                f"ALREADY_EXISTS: the trainer has a dataset {args.name!r} already; "
                "give --overwrite to replace it"
            ) from None
        finally:
            progress.close()
    progress.finish()
    print_datasets([info])


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
        from shared.cli.plot import history_figure  # needs matplotlib, an optional extra
    except ImportError:
        return report("`tandem jobs plot` needs matplotlib: pip install -e '.[plot]' in a checkout")
    with trainer_client(args) as trainer:
        job = trainer.get_job(args.job_id)
    if not job.history:
        raise ValueError(f"job {job.job_id} has no finished epoch to plot yet")
    history_figure(job, [metrics_dict(epoch) for epoch in job.history]).savefig(args.out)
    print(f"wrote {args.out}")
    return None
