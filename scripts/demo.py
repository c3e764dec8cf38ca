"""`make demo`: Tandem's services on one machine, used through gRPC as any client would.

1. Start a checkpoint store: an embedded Redis, or the one REDIS_URL names.
2. Start an inference service and a trainer service in this process, each
   on a free port of 127.0.0.1. The inference service starts first, with
   nothing to serve yet: it follows the digits CNN's versions as they come.
3. Train the digits CNN through the trainer's API, publishing a checkpoint
   every epoch, with the progress `tandem jobs watch` shows; after each
   published checkpoint, wait (bounded) until the inference service serves
   that version, and say how long after the publish it did.
4. List the versions published, and the final test accuracy.
5. Predict the held-out digits (the test split, in one request) through the
   inference service; print the accuracy and the version that answered.

With `--tls` (`make demo TLS=1`) every call goes over mutual TLS: the demo
makes a throwaway CA, a server certificate for 127.0.0.1 and a client
certificate in its temporary directory (shared.security.certs), the services ask
for client certificates signed by that CA, and the clients present one.

Everything it started is stopped at the end, also after an error or Ctrl-C.
The services log to a file in a temporary directory, so that the demo's own
lines stay readable. Each service runs as a context manager on the one
ExitStack: another service is one more `services.enter_context(...)`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np

from infer_svc.config import InferConfig
from infer_svc.server import InferenceServer
from shared.checkpoints.redis_client import redis_url_from_env
from shared.cli.errors import EXIT_INTERRUPTED
from shared.cli.jobs import watch_job
from shared.cli.output import accuracy_text, print_checkpoints
from shared.client import Connection, InferenceClient, TrainerClient
from shared.data import load_dataset
from shared.embedded.redis_server import redis_for_local_use
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from shared.security.certs import CertificateAuthority
from shared.security.tls import ClientTLS, ServerTLS
from trainer_svc.config import TrainerConfig
from trainer_svc.server import TrainerServer

MODEL_NAME = "digits-cnn"
READY_TIMEOUT = 10.0  # seconds a started service has to report SERVING
RELOAD_TIMEOUT = 10.0  # seconds the inference service has to serve a published version
RELOAD_POLL = 0.005  # seconds between two looks at which version it serves
STOP_GRACE = 10.0  # seconds a running job has to checkpoint when the demo stops early


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the digits CNN and serve it as it trains.")
    parser.add_argument("--tls", action="store_true", help="every call over mutual TLS, with a throwaway CA")
    args = parser.parse_args(argv)
    log_file = log_to_temporary_file()
    print(f"Tandem demo (service logs: {log_file})")
    if args.tls:
        server_tls, client = throwaway_certificates(log_file.parent)
        print(f"transport: mutual TLS, certificates from a throwaway CA in {log_file.parent}")
    else:
        server_tls, client = None, Connection()
    try:
        with ExitStack() as services:
            redis_url = services.enter_context(redis_for_local_use())
            print(
                "checkpoint store: "
                + ("Redis at $REDIS_URL" if redis_url_from_env() else "an embedded Redis, in memory")
            )
            # Before the trainer, so that it sees every version from the first one on.
            inference = services.enter_context(running_inference(redis_url, server_tls, client))
            trainer = services.enter_context(running_trainer(redis_url, server_tls, client))
            job = train_digits(trainer, inference)
            if job.state != pb.JOB_STATE_SUCCEEDED:
                return 1
            print(f"\nversions of {MODEL_NAME} in the store, newest first (* = latest):")
            print_checkpoints(trainer.list_checkpoints(MODEL_NAME))
            print(f"\nfinal test accuracy {job.last_metrics.test_accuracy:.2%}")
            predict_held_out_digits(inference)
    except KeyboardInterrupt:
        print("\ndemo interrupted; the services it started are stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def log_to_temporary_file() -> Path:
    log_file = Path(tempfile.mkdtemp(prefix="tandem-demo-")) / "services.log"
    logging.basicConfig(
        filename=log_file, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    return log_file


def throwaway_certificates(directory: Path) -> tuple[ServerTLS, Connection]:
    """A CA, a server certificate for 127.0.0.1 and a client's, written to `directory`: the
    servers' TLS settings (mutual) and the clients' connection."""

    ca = CertificateAuthority.new("tandem-demo-ca")
    ca_file = ca.write(directory / "ca.pem")
    server = ca.issue("tandem-demo-server", hosts=("127.0.0.1", "localhost")).write(directory / "server")
    client = ca.issue("tandem-demo-client", client=True).write(directory / "client")
    return (
        ServerTLS(server["cert"], server["key"], client_ca=ca_file),
        Connection(ClientTLS(ca_file, client["cert"], client["key"])),
    )


@contextmanager
def running_inference(redis_url: str, tls: ServerTLS | None, connection: Connection):
    """An inference service on a free port of 127.0.0.1 (no metrics) that serves MODEL_NAME's
    latest version; yields a client. It is live at once, and ready once a version serves."""
    config = InferConfig(
        redis_url=redis_url,
        listen="127.0.0.1:0",
        http_listen=None,  # the demo speaks gRPC; `make services` may hold the HTTP port
        models=(MODEL_NAME,),
        pinned={},
        metrics_port=0,
        tls=tls,
    )
    server = InferenceServer(config).start()
    print(
        f"inference service: 127.0.0.1:{server.port} "
        f"(serves the latest version of {MODEL_NAME}, reloading each one as it is published)"
    )
    try:
        with InferenceClient(f"127.0.0.1:{server.port}", connection=connection) as client:
            yield client
    finally:
        server.stop(STOP_GRACE)


@contextmanager
def running_trainer(redis_url: str, tls: ServerTLS | None, connection: Connection):
    """A trainer service on a free port of 127.0.0.1 (no metrics); yields a client, ready."""
    # Its own jobs only: never resume the unfinished jobs a shared Redis may hold.
    config = TrainerConfig(
        redis_url=redis_url, listen="127.0.0.1:0", metrics_port=0, resume_interrupted=False, tls=tls
    )
    server = TrainerServer(config).start()
    print(
        f"trainer service: 127.0.0.1:{server.port} "
        f"(keeps the latest {config.checkpoint_retention} versions of a model)\n"
    )
    try:
        with TrainerClient(f"127.0.0.1:{server.port}", connection=connection) as client:
            client.wait_until_ready(READY_TIMEOUT)
            yield client
    finally:
        server.stop(STOP_GRACE)


def train_digits(trainer: TrainerClient, inference: InferenceClient) -> pb.Job:
    """Train the digits-cnn preset on digits with a checkpoint every epoch; return the ended job.

    After each published checkpoint, says when the inference service serves it.
    """
    job = trainer.start_job(MODEL_NAME, "digits", preset="digits-cnn", every_epoch=True)
    return watch_job(trainer, job.job_id, on_checkpoint=lambda event: report_reload(inference, event))


def report_reload(inference: InferenceClient, event: pb.JobEvent) -> None:
    """Look at which version the inference service serves until it is the one just published
    (or a newer one), for at most RELOAD_TIMEOUT seconds; print how long after the publish."""
    version = event.checkpoint.version
    published = event.time.ToNanoseconds() / 1e9  # when the trainer reported it; same clock
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while True:
        served = served_version(inference)
        if served is not None and served >= version:
            print(
                f"inference now serves version {served} "
                f"(after {max(0.0, time.time() - published) * 1e3:.0f} ms)"
            )
            return
        if time.monotonic() > deadline:
            print(
                f"inference still serves version {served or 'none'}, "
                f"{RELOAD_TIMEOUT:.0f} s after version {version} was published"
            )
            return
        time.sleep(RELOAD_POLL)


def served_version(inference: InferenceClient) -> int | None:
    """The version of MODEL_NAME the inference service answers with; None while it has none."""
    try:
        return inference.model_metadata(MODEL_NAME).version
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return None
        raise


def predict_held_out_digits(inference: InferenceClient) -> None:
    """The digits test split through the inference service in one request: accuracy and version."""
    digits = load_dataset("digits")
    prediction = inference.predict(MODEL_NAME, digits.x_test)
    correct = int(np.sum(prediction.classes == digits.y_test))
    print(
        f"\ninference service: {len(digits.y_test)} held-out digits in one request, "
        f"accuracy {accuracy_text(correct, len(digits.y_test))}, "
        f"answered by version {prediction.version}"
    )


if __name__ == "__main__":
    sys.exit(main())
