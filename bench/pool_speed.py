"""The trainer pool: jobs per hour of one trainer against three, and how long a killed trainer's job waits.

Every trainer is a `python -m trainer_svc` process of its own on one
embedded Redis (or REDIS_URL's), one job slot each, BLAS at BENCH_THREADS.

- Throughput: the same twelve small jobs (an MLP on the built-in digits),
  submitted at once, on one trainer and then on three; jobs per hour from
  the first submission to the last job's end. On this 2-core machine three
  trainers share two cores, so the ratio says what the pool costs rather
  than what it gains; on three machines each trainer has its cores to
  itself and the ratio approaches 3 for jobs this size (the pool's own work
  is a few Redis round trips per job).
- Take-over: a trainer is SIGKILLed while it trains a job; the time until
  another trainer has it RUNNING again (from its last checkpoint), with the
  default lease settings (TRAINER_LEASE_MS 10 s, TAKEOVER_SCAN 3 s: the
  lease must expire, then a scan queue the job). Repeated, p50 and max.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from bench.common import bench_threads, print_facts, print_table, quick_mode, redis_session, write_json
from shared.embedded.redis_server import free_loopback_port
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from shared.rpc.stubs import tandem_trainer_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
JOBS = 12
FINISHED = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


class TrainerProcess:
    """One `python -m trainer_svc` on `redis_url`, serving on a loopback port of its own."""

    def __init__(self, redis_url: str, workdir: Path, **settings: str):
        self.port = free_loopback_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "TANDEM_", "REDIS_"))}
        threads = str(bench_threads())
        env.update(
            REDIS_URL=redis_url,
            TRAINER_LISTEN=f"127.0.0.1:{self.port}",
            TRAINER_METRICS_PORT="0",
            TANDEM_DATA_DIR=str(workdir / "data"),
            OMP_NUM_THREADS=threads,
            OPENBLAS_NUM_THREADS=threads,
            **settings,
        )
        self.log = open(workdir / f"trainer-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop
        command = [sys.executable, "-m", "trainer_svc"]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.TrainerStub(self.channel)
        grpc.channel_ready_future(self.channel).result(timeout=60)

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self.log.close()


@contextmanager
def trainers(redis_url: str, workdir: Path, count: int, **settings: str):
    with ExitStack() as stack:
        started = []
        for _ in range(count):
            trainer = TrainerProcess(redis_url, workdir, **settings)
            stack.callback(trainer.stop)
            started.append(trainer)
        yield started


def small_job(name: str, epochs: int, batch_size: int = 32, every_steps: int = 0) -> pb.StartJobRequest:
    return pb.StartJobRequest(
        model_name=name,
        dataset="digits",
        preset="mlp",
        hidden=[64],
        hyperparameters=pb.Hyperparameters(epochs=epochs, batch_size=batch_size, seed=0),
        checkpoints=pb.CheckpointSchedule(every_steps=every_steps),
    )


def get(stub, job_id: str) -> pb.Job:
    return stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)


def wait_for(stub, job_id: str, done, timeout: float, interval: float = 0.05) -> pb.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = get(stub, job_id)
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not there within {timeout} s: {pb.JobState.Name(job.state)}")
        time.sleep(interval)  # polling a remote state: nothing to wait on instead


def jobs_per_hour(redis_url: str, workdir: Path, count: int, round_name: str, epochs: int) -> float:
    with trainers(redis_url, workdir, count) as pool:
        started = time.monotonic()
        ids = [
            pool[i % count].stub.StartJob(small_job(f"{round_name}-{i}", epochs), timeout=10).job_id
            for i in range(JOBS)
        ]
        for job_id in ids:
            job = wait_for(pool[0].stub, job_id, lambda j: j.state in FINISHED, timeout=1800, interval=0.2)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        return JOBS / (time.monotonic() - started) * 3600


def take_over_seconds(redis_url: str, workdir: Path, name: str) -> float:
    """SIGKILL the trainer that holds a running job; seconds until another has it RUNNING."""
    with trainers(redis_url, workdir, 1) as (doomed,):
        job = doomed.stub.StartJob(small_job(name, epochs=50, batch_size=1, every_steps=200), timeout=10)
        held = wait_for(doomed.stub, job.job_id, lambda j: j.last_published_version >= 1, timeout=120)
        with trainers(redis_url, workdir, 1) as (survivor,):
            killed = time.monotonic()
            doomed.process.kill()
            wait_for(
                survivor.stub,
                job.job_id,
                lambda j: j.state == pb.JOB_STATE_RUNNING and j.restarts == 1 and j.trainer != held.trainer,
                timeout=120,
                interval=0.02,
            )
            seconds = time.monotonic() - killed
            survivor.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=10)
            wait_for(survivor.stub, job.job_id, lambda j: j.state in FINISHED, timeout=60)
        return seconds


def run() -> None:
    quick = quick_mode()
    epochs, repeats = (2, 2) if quick else (30, 5)
    with redis_session() as (url, facts), tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        facts["jobs"] = f"{JOBS} x mlp [64] on digits, {epochs} epochs, batch 32; one slot per trainer"
        print_facts("Trainer pool: one trainer vs three, and take-over after SIGKILL", facts)
        one = jobs_per_hour(url, workdir, 1, "one", epochs)
        three = jobs_per_hour(url, workdir, 3, "three", epochs)
        takeovers = [take_over_seconds(url, workdir, f"killed-{i}") for i in range(repeats)]
    rows = [
        ["jobs/hour, 1 trainer", f"{one:,.0f}", ""],
        ["jobs/hour, 3 trainers", f"{three:,.0f}", f"{three / one:.2f}x of 1"],
        [
            f"take-over after SIGKILL ({repeats} runs)",
            f"p50 {statistics.median(takeovers):.1f} s",
            f"max {max(takeovers):.1f} s",
        ],
    ]
    print_table(["what", "figure", "ratio / spread"], rows)
    write_json(
        "pool",
        {
            "facts": facts,
            "jobs_per_hour": {"one_trainer": one, "three_trainers": three, "ratio": three / one},
            "take_over_seconds": takeovers,
        },
    )
