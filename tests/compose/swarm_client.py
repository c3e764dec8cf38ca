"""A client of a Swarm stack, run inside it: `docker exec DRIVER python -m tests.compose.swarm_client ...`.

The swarm tier's tests cannot reach the stack from this machine (nothing is published:
see deploy/swarm/tandem-stack.yml), so they run this script in a container on the stack's
`clients` network (tests/compose/swarm.py starts it), where the services' names resolve to
their tasks. It uses Tandem's own clients, from the trainer image, with the credentials
the container is given (TANDEM_TLS_CA, TANDEM_TOKEN_FILE), and prints JSON on stdout:

    start MODEL EPOCHS           StartJob on digits-cnn; {"job_id": ...}
    replicas MODEL               Predict once on every address `infer` resolves to
    resolves NAME                the addresses NAME resolves to here ([] if none)
    served MODEL                 each inference task's count of answered Predicts of MODEL
                                 (its Prometheus metrics), by address
    follow STOP_FILE JOB_ID      GetJob every 0.2 s; a line each time the record's state,
                                 trainer, restarts or last version changes, until it ends
    loop STOP_FILE MODEL         Predict in a loop through `dns:///infer:50052` with
                                 round_robin, one retry on a failed call, one JSON line per
                                 request

The two streams end when STOP_FILE exists, at the latest after MAX_LOOP_SECONDS.

The container has the trainer image's packages and tests/ (mounted read-only), of which this
imports only metrics_text.py: nothing that needs the dev dependencies.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Callable

import grpc

from shared.client import TrainerClient
from shared.client.connection import Connection
from shared.data import load_dataset
from shared.rpc.convert import to_tensor
from shared.rpc.stubs import tandem_inference_pb2 as pb
from shared.rpc.stubs import tandem_inference_pb2_grpc, tandem_trainer_pb2
from tests.compose.metrics_text import predicts_answered

TRAINER, INFER, INFER_PORT, INFER_METRICS_PORT = "trainer:50051", "infer", 50052, 9102
CALL_TIMEOUT = 10.0
LOOP_INTERVAL = 0.02
FOLLOW_INTERVAL = 0.2
MAX_LOOP_SECONDS = 900.0
# gRPC's DNS resolver looks names up again when a connection drops, but by default at most
# every 30 s: a rolling update replaces tasks faster than that, so the loop asks for 0.5 s.
LOOP_OPTIONS = [
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    ("grpc.dns_min_time_between_resolutions_ms", 500),
]


def sample():
    return to_tensor(load_dataset("digits").x_test[:4])


def start(model: str, epochs: str) -> dict:
    with TrainerClient(TRAINER, timeout=CALL_TIMEOUT) as trainer:
        job = trainer.start_job(
            model,
            "digits",
            preset="digits-cnn",
            hyperparameters={"epochs": int(epochs), "seed": 7},
            every_steps=50,
            every_epoch=False,
        )
    return {"job_id": job.job_id}


def follow(stop_file: str, job_id: str) -> None:
    """The job's record as it changes, each line with its time, until the job has ended.

    Through any trainer: a call that fails (its trainer was killed) is reported, and the next
    goes through a new channel, to whichever trainer `trainer` resolves to then.
    """
    trainer, last = None, None
    deadline = time.monotonic() + MAX_LOOP_SECONDS
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        trainer = trainer or TrainerClient(TRAINER, timeout=CALL_TIMEOUT)
        try:
            record = trainer.get_job(job_id)
        except grpc.RpcError as error:
            print(
                json.dumps({"t": time.time(), "error": f"{error.code().name}: {error.details()}"}), flush=True
            )
            trainer.close()
            trainer = None
        else:
            state = {
                "state": tandem_trainer_pb2.JobState.Name(record.state).removeprefix("JOB_STATE_"),
                "trainer": record.trainer,
                "restarts": record.restarts,
                "last_published_version": record.last_published_version,
            }
            if state != last:
                print(json.dumps({"t": time.time(), **state, "error": record.error}), flush=True)
                last = state
            if record.HasField("finished_at"):
                break
        time.sleep(FOLLOW_INTERVAL)  # pacing: GetJob five times a second
    if trainer is not None:
        trainer.close()


def resolves(name: str) -> list[str]:
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)})
    except socket.gaierror:
        return []


def served(model: str) -> dict[str, float]:
    counts = {}
    for address in resolves(INFER):
        url = f"http://{address}:{INFER_METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=CALL_TIMEOUT) as response:
            counts[address] = predicts_answered(response.read().decode(), model)
    return counts


def replicas(model: str) -> list[dict]:
    """One Predict on each task of `infer`, addressed by IP, the certificate checked for `infer`."""
    connection, request = Connection.from_env(), pb.PredictRequest(model_name=model, inputs=sample())
    answers = []
    for address in resolves(INFER):
        channel = connection.channel(f"{address}:{INFER_PORT}", [("grpc.ssl_target_name_override", INFER)])
        try:
            stub = tandem_inference_pb2_grpc.InferenceStub(channel)
            answers.append(
                {"address": address, "version": stub.Predict(request, timeout=CALL_TIMEOUT).version}
            )
        except grpc.RpcError as error:
            answers.append({"address": address, "error": f"{error.code().name}: {error.details()}"})
        finally:
            channel.close()
    return answers


def loop(stop_file: str, model: str) -> None:
    """Predict until `stop_file` exists; each request's outcome as a line, flushed at once."""
    request = pb.PredictRequest(model_name=model, inputs=sample())
    channel = Connection.from_env().channel(f"dns:///{INFER}:{INFER_PORT}", LOOP_OPTIONS)
    stub = tandem_inference_pb2_grpc.InferenceStub(channel)
    deadline = time.monotonic() + MAX_LOOP_SECONDS
    while not os.path.exists(stop_file) and time.monotonic() < deadline:
        outcome: dict = {"t": time.time(), "ok": False, "first_error": None, "error": None}
        for attempt in range(2):  # one retry: Predict is idempotent
            try:
                outcome.update(ok=True, version=stub.Predict(request, timeout=CALL_TIMEOUT).version)
                break
            except grpc.RpcError as error:
                outcome["first_error" if attempt == 0 else "error"] = (
                    f"{error.code().name}: {error.details()}"
                )
        print(json.dumps(outcome), flush=True)
        time.sleep(LOOP_INTERVAL)
    channel.close()


STREAMS: dict[str, Callable[..., None]] = {"loop": loop, "follow": follow}
COMMANDS: dict[str, Callable[..., object]] = {
    "start": start,
    "replicas": replicas,
    "resolves": resolves,
    "served": served,
}


def main(command: str, *args: str) -> None:
    if command in STREAMS:
        STREAMS[command](*args)
    else:
        print(json.dumps(COMMANDS[command](*args)))


if __name__ == "__main__":
    main(*sys.argv[1:])
