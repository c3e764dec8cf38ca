"""`make demo`: Tandem's services on one machine, used through gRPC as any client would.

1. Start a checkpoint store: an embedded Redis, or the one REDIS_URL names.
2. Start a trainer service in this process, on a free port of 127.0.0.1.
3. Train the digits CNN through the trainer's API, publishing a checkpoint
   every epoch, with the progress `tandem jobs watch` shows.
4. List the versions published, and the final test accuracy.

Everything it started is stopped at the end, also after an error or Ctrl-C.
The services log to a file in a temporary directory, so that the demo's own
lines stay readable. Each service runs as a context manager on the one
ExitStack: another service is one more `services.enter_context(...)`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

from shared.cli import EXIT_INTERRUPTED, print_checkpoints, watch_job
from shared.client import TrainerClient
from shared.embedded_redis import redis_for_local_use
from shared.redis_client import redis_url_from_env
from shared.rpc import tandem_trainer_pb2 as pb
from trainer_svc.config import TrainerConfig
from trainer_svc.server import TrainerServer

MODEL_NAME = "digits-cnn"
READY_TIMEOUT = 10.0  # seconds a started service has to report SERVING
STOP_GRACE = 10.0     # seconds a running job has to checkpoint when the demo stops early


def main() -> int:
    log_file = log_to_temporary_file()
    print(f"Tandem demo (service logs: {log_file})")
    try:
        with ExitStack() as services:
            redis_url = services.enter_context(redis_for_local_use())
            print("checkpoint store: " + ("Redis at $REDIS_URL" if redis_url_from_env()
                                          else "an embedded Redis, in memory"))
            trainer = services.enter_context(running_trainer(redis_url))
            job = train_digits(trainer)
            if job.state != pb.JOB_STATE_SUCCEEDED:
                return 1
            print(f"\nversions of {MODEL_NAME} in the store, newest first (* = latest):")
            print_checkpoints(trainer.list_checkpoints(MODEL_NAME))
            print(f"\nfinal test accuracy {job.last_metrics.test_accuracy:.2%}")
    except KeyboardInterrupt:
        print("\ndemo interrupted; the services it started are stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def log_to_temporary_file() -> Path:
    log_file = Path(tempfile.mkdtemp(prefix="tandem-demo-")) / "services.log"
    logging.basicConfig(filename=log_file, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return log_file


@contextmanager
def running_trainer(redis_url: str):
    """A trainer service on a free port of 127.0.0.1 (no metrics); yields a client, ready."""
    # Its own jobs only: never resume the unfinished jobs a shared Redis may hold.
    config = TrainerConfig(redis_url=redis_url, listen="127.0.0.1:0", metrics_port=0,
                           resume_interrupted=False)
    server = TrainerServer(config).start()
    print(f"trainer service: 127.0.0.1:{server.port} "
          f"(keeps the latest {config.checkpoint_retention} versions of a model)\n")
    try:
        with TrainerClient(f"127.0.0.1:{server.port}") as client:
            client.wait_until_ready(READY_TIMEOUT)
            yield client
    finally:
        server.stop(STOP_GRACE)


def train_digits(trainer: TrainerClient) -> pb.Job:
    """Train the digits-cnn preset on digits with a checkpoint every epoch; return the ended job."""
    job = trainer.start_job(MODEL_NAME, "digits", preset="digits-cnn", every_epoch=True)
    return watch_job(trainer, job.job_id)


if __name__ == "__main__":
    sys.exit(main())
