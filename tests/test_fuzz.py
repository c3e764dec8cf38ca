"""The fuzz tier: over 10,000 hostile requests to every RPC of both servers, which must stay well.

Both servers run as they are deployed (`python -m trainer_svc`, `python -m
infer_svc`) on 127.0.0.1, each on an embedded Redis of its own: the
inference server only reads its store, which holds nothing but the model
published here, so all it answers before the fuzz it must answer the same
after it; the jobs that the fuzz gets accepted publish into the trainer's
store, whose reference model (REFERENCE_CHECKPOINT) no fuzzed job names.

Every method comes from the servers' reflection (tests/fuzz_calls.py), the
requests from Hypothesis strategies built on each request type's
descriptor (tests/fuzz_inputs.py), seeded with the valid requests of
`seeds` and steered by VOCABULARY; all derandomised, so every run sends the
same requests. A job the fuzz starts is cancelled at once. Each answer is
checked as it comes:

- its status is OK or one of EXPECTED. UNKNOWN is an exception that a
  handler let out; INTERNAL would be grpcio's answer to bytes that do not
  parse, which shared.rpc.request_guard answers first: a request whose bytes do
  not parse must get its INVALID_ARGUMENT (UNPARSABLE). UNAVAILABLE is a failure
  too: Redis is up and no server shuts down meanwhile, so none of its
  documented causes holds (it is what a request that reached a wrong Redis
  key got);
- DEADLINE_EXCEEDED (a call not answered within DEADLINE) is a failure.

Afterwards both servers must be SERVING, answer the known-good requests
(`known_good`) as before, keep the published checkpoints' bytes (and
verify them), have grown their RSS by no more than the bounds below, stop
cleanly on SIGTERM, and have logged no traceback. The report (`pytest -s` prints it, and a
failure's message holds it) gives the requests per method and kind, the
statuses seen, RSS before, peak and after, and the time taken.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.internal.conjecture import providers

from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore
from shared.embedded.redis_server import EmbeddedRedis, free_loopback_port
from shared.nn.presets import PRESETS
from shared.rpc.convert import to_tensor
from shared.rpc.stubs import grpc_service_pb2 as kserve_pb
from shared.rpc.stubs import tandem_inference_pb2 as infer_pb
from shared.rpc.stubs import tandem_trainer_pb2 as trainer_pb
from tests.fuzz_calls import CANCELLED_BY_CLIENT, Outcome, call, path, served_methods
from tests.fuzz_inputs import KINDS, Fuzzer, FuzzRequest, field_count, message_class
from tests.helpers import wait_until
from tests.inference_harness import NAME as SERVED_MODEL
from tests.inference_harness import publish, samples

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 10.0  # seconds for every call; generous, so a call past it is a failure
REQUESTS = 10_000  # generated in all, shared among methods by their request types' sizes
AT_LEAST = 10_000  # sent in all (Hypothesis stops early on request types with few values)
PER_METHOD = 60  # generated for each method at least
IN_FLIGHT = 8  # calls at once, over both servers
FROZEN_AFTER = 3  # calls past their deadline after which a server is left alone
STARTUP = 60.0  # seconds for a server to start, and for the reference job to end
GRACE = 10.0  # the servers' shutdown grace; SIGTERM must stop them within it (+ STOP_SLACK)
STOP_SLACK = 10.0
MiB = 2**20
# RSS bounds. Measured here (2 cores, 11,000 requests): both servers start at about 70 MiB and
# peak about 105-140 MiB higher, keeping 90-120 MiB of it (allocator arenas, gRPC buffers, the
# records of ~400 cancelled jobs). The peak may be a job the fuzz got accepted, which the
# trainer's estimate bounds (JOB_MEMORY, set low here), plus the requests in flight (at most 32
# of at most 8 MiB, each parsed once); what is kept at 300 MiB catches a leak of 30 KB a request.
JOB_MEMORY = 512 * MiB  # TRAINER_MAX_JOB_MEMORY_BYTES for the fuzzed trainer
PEAK_GROWTH = JOB_MEMORY + 512 * MiB  # VmHWM at the end over VmRSS before the fuzz
KEPT_GROWTH = 300 * MiB  # VmRSS after over VmRSS before

EXPECTED = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    CANCELLED_BY_CLIENT,
}
UNPARSABLE = ("INVALID_ARGUMENT", "the request is not a valid message for ")  # shared.rpc.request_guard
JOB_FAILED_LOG = "event=job_failed"  # a job that failed in training logs why: not a handler's traceback
IDLE_WORKER = re.compile(
    r"\(most recent call first\):\n\s+File \"[^\"]*concurrent/futures/thread\.py\", line \d+ in _worker"
)
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", re.M)
MessageT = TypeVar("MessageT", bound=Message)

REFERENCE_CHECKPOINT = "fuzz-reference"  # in the trainer's store; no fuzzed job publishes to it
REFERENCE_JOB_MODEL = "fuzz-job"  # the one job started (and cancelled) before the fuzz
EXPECTED_SERVICES = {
    "trainer": {
        trainer_pb.DESCRIPTOR.services_by_name["Trainer"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    },
    "inference": {
        infer_pb.DESCRIPTOR.services_by_name["Inference"].full_name,
        kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    },
}
MODEL_NAMES = [SERVED_MODEL, "fuzzed", "m", "a" * 64]
VERSIONS = ["1", "2", "0", "-1", "+1", "١", " 1", "1.0", "01", "18446744073709551617"]
DTYPES = [
    "float32",
    "float64",
    "float16",
    "uint8",
    "int64",
    "int32",
    "bool",
    "f4,,",
    "T",
    "O",
    "V8",
    "<f4",
    ">f8",
    "U3",
    "S4",
    "complex128",
    "object",
    "float96",
    "int4",
    "M8[ns]",
]
VOCABULARY = {  # words fields accept, by field name or "Message.field" (tests/fuzz_inputs.py)
    "model_name": MODEL_NAMES,
    "tandem.v1.ListCheckpointsRequest.model_name": [*MODEL_NAMES, REFERENCE_CHECKPOINT],
    "tandem.v1.ListJobsRequest.model_name": [*MODEL_NAMES, REFERENCE_JOB_MODEL],
    "inference.ModelReadyRequest.name": MODEL_NAMES,
    "inference.ModelMetadataRequest.name": MODEL_NAMES,
    "inference.ModelInferRequest.InferInputTensor.name": ["input", "probabilities", "classes"],
    "inference.ModelInferRequest.InferRequestedOutputTensor.name": ["probabilities", "classes", "input"],
    "tandem.v1.UploadDatasetHeader.name": ["fuzz-upload", "digits", "uploaded"],
    "tandem.v1.DatasetArrayHeader.name": ["x", "y", "x_train", "y_train", "x_test", "y_test"],
    "array": ["x", "y", "x_train", "y_train", "x_test", "y_test"],
    "dataset": ["digits", "fuzz-upload", "fashion-mnist", "mnist"],
    "preset": sorted(PRESETS),
    "dtype": DTYPES,
    "datatype": ["FP32", "FP64", "FP16", "BF16", "INT64", "INT32", "UINT8", "BOOL", "BYTES"],
    "optimizer": ["sgd", "momentum", "nesterov", "adam"],
    "lr_schedule": ["constant", "cosine"],
    "early_stopping_monitor": ["val_loss", "val_accuracy"],
    "version": VERSIONS,
    "model_version": VERSIONS,
    "page_token": ["1", "2", "0", "-1", "100", "1e3"],
    "key": ["priority", "timeout", "binary_data", "classification", "sequence_id"],
    "service": ["", *sorted(set().union(*EXPECTED_SERVICES.values())), SERVED_MODEL],
    "file_by_filename": ["tandem_trainer.proto", "grpc_service.proto", "tandem_common.proto"],
    "file_containing_symbol": ["tandem.v1.Trainer", "inference.ModelInferRequest", "tandem.v1.Tensor"],
    "sha256": ["0" * 64],
}
SPEC = (
    '{"input_shape": [1, 8, 8], "layers": [{"type": "conv2d", "filters": 4, "kernel_size": 3, '
    '"padding": "same"}, {"type": "relu"}, {"type": "maxpool2d", "size": 2}, {"type": "flatten"}, '
    '{"type": "dense", "units": 10, "init": "he", "init_std": 0.01}]}'
)


# ---------------------------------------------------------------- the servers


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    channel: grpc.Channel
    log: Path
    late_calls: int = 0  # calls past their deadline

    @property
    def frozen(self) -> bool:
        return self.late_calls >= FROZEN_AFTER

    def unary(self, method: str, request: Message, response_class: type[MessageT]) -> MessageT:
        """A known call, which must succeed."""
        return response_class.FromString(
            self.channel.unary_unary(method)(request.SerializeToString(), timeout=DEADLINE)
        )

    def serving(self, service: str = "") -> bool:
        try:
            reply = self.unary(
                "/grpc.health.v1.Health/Check",
                health_pb2.HealthCheckRequest(service=service),
                health_pb2.HealthCheckResponse,
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (the peak RSS) in bytes, from /proc."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        memory: dict[str, int] = {}
        for key in ("VmRSS", "VmHWM"):
            match = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
            assert match, f"{self.name}: no {key} in /proc/{self.process.pid}/status"
            memory[key] = int(match.group(1)) * 1024
        return memory

    def stopped(self, deadline: float) -> str | None:
        """After SIGTERM: a problem unless the process exits 0 by `deadline` (time.monotonic()).

        A process still running then gets SIGABRT, on which faulthandler (PYTHONFAULTHANDLER)
        writes every thread's stack to its log, and the problem quotes them.
        """
        try:
            code = self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)
            try:
                self.process.wait(timeout=STOP_SLACK)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            dump = self.log.read_text(errors="replace").rpartition("Fatal Python error: Aborted")[2]
            threads = [stack.strip() for stack in dump.split("\n\n") if stack.strip()]
            busy = [stack for stack in threads if not IDLE_WORKER.search(stack)]
            return (
                f"{self.name}: still running {GRACE + STOP_SLACK:.0f} s after SIGTERM; its threads "
                f"then ({len(threads) - len(busy)} idle workers left out):\n" + "\n\n".join(busy)[:8000]
            )
        return None if code == 0 else f"{self.name}: exited with {code} after SIGTERM"


def start_server(stack: ExitStack, name: str, module: str, settings: dict[str, str], log: Path) -> Server:
    """`python -m module` with `settings` as its environment, once it answers health checks."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TRAINER_", "INFER_", "TANDEM_", "REDIS_"))
    }
    env.update(settings, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )

    def kill() -> None:
        if process.poll() is None:
            process.kill()
            process.wait()

    stack.callback(kill)
    listen = next(value for key, value in settings.items() if key.endswith("_LISTEN"))
    channel = grpc.insecure_channel(listen, options=[("grpc.max_receive_message_length", 64 * MiB)])
    server = Server(name, process, channel, log)

    def answering() -> bool:
        assert process.poll() is None, f"{name} exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            server.unary(
                "/grpc.health.v1.Health/Check",
                health_pb2.HealthCheckRequest(),
                health_pb2.HealthCheckResponse,
            )
        except grpc.RpcError:
            return False
        return True

    wait_until(answering, f"{name} to answer", STARTUP)
    return server


def handler_tracebacks(log: Path) -> tuple[list[str], list[str]]:
    """(records with a traceback from a handler, failed jobs' last lines)."""
    text = log.read_text(errors="replace")
    starts = [match.start() for match in LOG_RECORD.finditer(text)]
    records = [text[: starts[0]] if starts else text] + [
        text[start:end] for start, end in zip(starts, [*starts[1:], len(text)], strict=True)
    ]
    bad, jobs = [], []
    for record in records:
        if JOB_FAILED_LOG in record:
            jobs.append(record.rstrip().splitlines()[-1])
        elif "Traceback" in record or "Exception calling application" in record:
            bad.append(record.strip())
    return bad, jobs


# ---------------------------------------------------------------- requests


def upload_chunks(name: str) -> list[trainer_pb.UploadDatasetChunk]:
    """A valid upload of a tiny dataset: 20 samples of 4 features, two classes."""
    x = np.random.default_rng(0).random((20, 4), dtype=np.float32)
    y = np.arange(20, dtype=np.int64) % 2
    arrays = {"x": to_tensor(x), "y": to_tensor(y)}
    header = trainer_pb.UploadDatasetHeader(
        name=name,
        arrays=[
            trainer_pb.DatasetArrayHeader(
                name=key, dtype=tensor.dtype, shape=tensor.shape, size_bytes=len(tensor.data)
            )
            for key, tensor in arrays.items()
        ],
    )
    return [trainer_pb.UploadDatasetChunk(header=header)] + [
        trainer_pb.UploadDatasetChunk(piece=trainer_pb.DatasetArrayPiece(array=key, data=tensor.data))
        for key, tensor in arrays.items()
    ]


def seeds(job_id: str) -> dict[str, list[list[Message]]]:
    """Valid requests by method path, each the list of its messages: what the fuzz mutates and damages."""
    hyperparameters = trainer_pb.Hyperparameters(epochs=1, batch_size=32, seed=0, learning_rate=1e-3)
    x = to_tensor(samples(2, seed=3))
    kserve_input = kserve_pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[2, 1, 8, 8]
    )
    one = lambda *messages: [[message] for message in messages]  # noqa: E731 - unary requests
    return {
        "/tandem.v1.Trainer/StartJob": one(
            trainer_pb.StartJobRequest(
                model_name="fuzzed",
                preset="mlp",
                hidden=[16],
                dataset="digits",
                hyperparameters=hyperparameters,
            ),
            trainer_pb.StartJobRequest(
                model_name="fuzzed",
                spec_json=SPEC,
                dataset="digits",
                hyperparameters=hyperparameters,
                checkpoints=trainer_pb.CheckpointSchedule(every_steps=5),
            ),
        ),
        "/tandem.v1.Trainer/GetJob": one(trainer_pb.GetJobRequest(job_id=job_id)),
        "/tandem.v1.Trainer/WatchJob": one(trainer_pb.WatchJobRequest(job_id=job_id)),
        "/tandem.v1.Trainer/CancelJob": one(trainer_pb.CancelJobRequest(job_id=job_id)),
        "/tandem.v1.Trainer/ListJobs": one(
            trainer_pb.ListJobsRequest(
                states=[trainer_pb.JOB_STATE_CANCELLED], model_name=REFERENCE_JOB_MODEL, page_size=10
            )
        ),
        "/tandem.v1.Trainer/ListCheckpoints": one(
            trainer_pb.ListCheckpointsRequest(model_name=REFERENCE_CHECKPOINT)
        ),
        "/tandem.v1.Trainer/UploadDataset": [upload_chunks("fuzz-upload")],
        "/tandem.v1.Inference/Predict": one(
            infer_pb.PredictRequest(model_name=SERVED_MODEL, inputs=x, top_k=3),
            infer_pb.PredictRequest(model_name=SERVED_MODEL, inputs=x, version=1),
        ),
        "/tandem.v1.Inference/GetModelMetadata": one(
            infer_pb.GetModelMetadataRequest(model_name=SERVED_MODEL)
        ),
        "/inference.GRPCInferenceService/ModelReady": one(kserve_pb.ModelReadyRequest(name=SERVED_MODEL)),
        "/inference.GRPCInferenceService/ModelMetadata": one(
            kserve_pb.ModelMetadataRequest(name=SERVED_MODEL, version="1")
        ),
        "/inference.GRPCInferenceService/ModelInfer": one(
            kserve_pb.ModelInferRequest(
                model_name=SERVED_MODEL, inputs=[kserve_input], raw_input_contents=[x.data]
            ),
            kserve_pb.ModelInferRequest(
                model_name=SERVED_MODEL,
                model_version="1",
                inputs=[
                    kserve_pb.ModelInferRequest.InferInputTensor(
                        name="input",
                        datatype="FP32",
                        shape=[2, 64],
                        contents=kserve_pb.InferTensorContents(fp32_contents=samples(2).ravel().tolist()),
                    )
                ],
                outputs=[kserve_pb.ModelInferRequest.InferRequestedOutputTensor(name="classes")],
            ),
        ),
        "/grpc.health.v1.Health/Check": one(health_pb2.HealthCheckRequest(service="")),
        "/grpc.health.v1.Health/Watch": one(health_pb2.HealthCheckRequest(service="")),
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": [
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="tandem.v1.Tensor"),
            ]
        ],
    }


def known_good(job_id: str) -> list[tuple[str, str, Message, type[Message]]]:
    """(server, method, request, response type): read-only calls, answered the same before and after."""
    requests = seeds(job_id)
    calls = [
        ("trainer", "/tandem.v1.Trainer/GetJob", trainer_pb.Job),
        ("trainer", "/tandem.v1.Trainer/ListJobs", trainer_pb.ListJobsResponse),
        ("trainer", "/tandem.v1.Trainer/ListCheckpoints", trainer_pb.ListCheckpointsResponse),
        ("inference", "/tandem.v1.Inference/Predict", infer_pb.PredictResponse),
        ("inference", "/tandem.v1.Inference/GetModelMetadata", infer_pb.ModelMetadata),
        ("inference", "/inference.GRPCInferenceService/ModelReady", kserve_pb.ModelReadyResponse),
        ("inference", "/inference.GRPCInferenceService/ModelMetadata", kserve_pb.ModelMetadataResponse),
        ("inference", "/inference.GRPCInferenceService/ModelInfer", kserve_pb.ModelInferResponse),
    ]
    return [
        (server, method, request, response)
        for server, method, response in calls
        for [request] in requests[method]
    ] + [
        (
            "inference",
            "/tandem.v1.Inference/ListModels",
            infer_pb.ListModelsRequest(),
            infer_pb.ListModelsResponse,
        ),
        (
            "inference",
            "/inference.GRPCInferenceService/ServerMetadata",
            kserve_pb.ServerMetadataRequest(),
            kserve_pb.ServerMetadataResponse,
        ),
    ]


def answers(servers: dict[str, Server], job_id: str) -> dict[tuple, Message | str]:
    """Each known-good call's answer (or its error, as text), and ListDatasets' datasets by name."""
    results: dict[tuple, Message | str] = {}
    for server, method, request, response_class in known_good(job_id):
        key = (server, method, request.SerializeToString())
        if servers[server].frozen:  # not asked: each call would wait out its deadline
            results[key] = "not asked: the server had stopped answering"
            continue
        try:
            results[key] = servers[server].unary(method, request, response_class)
        except grpc.RpcError as error:
            results[key] = f"{error.code().name}: {error.details()}"
    try:
        listing = servers["trainer"].unary(
            "/tandem.v1.Trainer/ListDatasets",
            trainer_pb.ListDatasetsRequest(),
            trainer_pb.ListDatasetsResponse,
        )
        for dataset in listing.datasets:
            results[("trainer", "ListDatasets", dataset.name)] = dataset
    except grpc.RpcError as error:
        results[("trainer", "ListDatasets", "")] = f"{error.code().name}: {error.details()}"
    return results


# ---------------------------------------------------------------- the fuzz run's record


@dataclass
class Record:
    """What the fuzz sent and got, counted per method; and the problems, grouped."""

    kinds: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: dict[tuple, list] = field(default_factory=dict)  # (method, status, details) -> [count, inputs]
    skipped: Counter = field(default_factory=Counter)  # by server, once it froze
    cancelled_jobs: int = 0
    seconds: float = 0.0  # the fuzz's, from the first request generated to the last answer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, request: FuzzRequest, outcome: Outcome, problem: str | None, describe) -> None:
        with self.lock:
            self.kinds[method][request.kind] += 1
            self.statuses[method][outcome.status] += 1
            if problem:
                key = (method, outcome.status, re.sub(r"\d+", "N", outcome.details)[:160])
                failure = self.failures.setdefault(key, [0, []])
                failure[0] += 1
                if len(failure[1]) < 3:
                    failure[1].append(f"{problem}; {describe()}")

    def add_error(self, method: str, error: Exception) -> None:
        """The test's own follow-up call (a CancelJob) failed."""
        with self.lock:
            failure = self.failures.setdefault((method, "follow-up call failed", repr(error)[:160]), [0, []])
            failure[0] += 1

    @property
    def sent(self) -> int:
        return sum(sum(counts.values()) for counts in self.kinds.values())

    def failure_report(self) -> list[str]:
        lines = []
        for (method, status, details), (count, examples) in sorted(self.failures.items()):
            lines.append(f"{method} -> {status} {details!r}: {count} requests, such as")
            lines += [f"    {example[:1500]}" for example in examples]
        return lines


def judge(outcome: Outcome, request: FuzzRequest, request_class: type[Message]) -> str | None:
    """Why the outcome is a failure, or None."""
    # A request whose (first) message does not parse is the guard's to answer; a later message
    # of a stream may not be reached, because an earlier, valid one was refused for its content.
    said_unparsable = outcome.status == UNPARSABLE[0] and outcome.details.startswith(UNPARSABLE[1])
    if said_unparsable and all(parses(payload, request_class) for payload in request.messages):
        return "answered as unparsable, but every message parses here"
    first_unparsable = bool(request.messages) and not parses(request.messages[0], request_class)
    if first_unparsable and not said_unparsable and outcome.status != CANCELLED_BY_CLIENT:
        return f"bytes that do not parse answered {outcome.status}, not as unparsable"
    if outcome.status in EXPECTED:
        return None
    if outcome.status == "DEADLINE_EXCEEDED":
        return f"no answer within {DEADLINE} s"
    return f"status {outcome.status}"


def parses(payload: bytes, request_class: type[Message]) -> bool:
    try:
        request_class.FromString(payload)
    except DecodeError:
        return False
    return True


def table(
    record: Record, memory: dict[str, dict[str, dict[str, int]]], seconds: float, log_notes: list[str]
) -> str:
    lines = [
        f"fuzz: {record.sent:,} requests in {record.seconds:.1f} s ({seconds:.1f} s with the servers' "
        f"start and stop), {IN_FLIGHT} in flight, deadline {DEADLINE:.0f} s; "
        f"jobs started and cancelled: {record.cancelled_jobs}",
        f"{'method':<62}" + "".join(f"{kind:>10}" for kind in KINDS) + "  statuses",
    ]
    for method in sorted(record.kinds):
        statuses = ", ".join(f"{status} {count}" for status, count in record.statuses[method].most_common())
        lines.append(
            f"{method:<62}" + "".join(f"{record.kinds[method][kind]:>10}" for kind in KINDS) + f"  {statuses}"
        )
    totals: Counter[str] = Counter()
    for counts in record.kinds.values():
        totals.update(counts)
    lines.append(f"{'all':<62}" + "".join(f"{totals[kind]:>10}" for kind in KINDS))
    lines.append(f"{'RSS (MiB)':<12}{'before':>10}{'peak':>10}{'after':>10}")
    for name, rss in memory.items():
        lines.append(
            f"{name:<12}{rss['before']['VmRSS'] / MiB:>10.0f}{rss['after']['VmHWM'] / MiB:>10.0f}"
            f"{rss['after']['VmRSS'] / MiB:>10.0f}"
        )
    if record.skipped:
        lines.append(f"not sent (the server had frozen): {dict(record.skipped)}")
    return "\n".join(lines + log_notes)


# ---------------------------------------------------------------- the test


@pytest.fixture
def hypothesis_alone(tmp_path, monkeypatch):
    """Hypothesis writing nothing into the work tree, and drawing from our strategies alone.

    By default it keeps caches in ./.hypothesis, and mixes into its draws
    constants it finds in the project's loaded modules, which depend on what
    else pytest imported: then a run of this file alone and `make test` would
    send different requests. (Hypothesis has no setting for either; the
    second is a private name, and the fixture fails loudly if it goes.)
    """
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    monkeypatch.setattr(providers, "_get_local_constants", providers.Constants)
    providers.CONSTANTS_CACHE.cache.clear()
    yield
    set_hypothesis_home_dir(None)


def test_fuzz_every_rpc_of_both_servers_and_they_stay_well(tmp_path, hypothesis_alone):
    started = time.monotonic()
    problems: list[str] = []
    with ExitStack() as stack:
        trainer_redis = stack.enter_context(EmbeddedRedis())
        infer_redis = stack.enter_context(EmbeddedRedis())
        trainer_store = CheckpointStore(stack.enter_context(connect(trainer_redis.url)))
        infer_store = CheckpointStore(stack.enter_context(connect(infer_redis.url)))
        publish(trainer_store, seed=1, name=REFERENCE_CHECKPOINT)
        publish(infer_store, seed=2, name=SERVED_MODEL)
        blobs = {
            (REFERENCE_CHECKPOINT, trainer_store): trainer_store.get_blob(REFERENCE_CHECKPOINT, 1),
            (SERVED_MODEL, infer_store): infer_store.get_blob(SERVED_MODEL, 1),
        }
        (tmp_path / "data").mkdir()
        trainer_port, infer_port = free_loopback_port(), free_loopback_port()
        servers = {
            "trainer": start_server(
                stack,
                "trainer",
                "trainer_svc",
                {
                    "REDIS_URL": trainer_redis.url,
                    "TRAINER_LISTEN": f"127.0.0.1:{trainer_port}",
                    "TRAINER_METRICS_PORT": "0",
                    "TRAINER_MAX_CONCURRENT_JOBS": "1",
                    "TRAINER_GRACE_SECONDS": str(GRACE),
                    "TANDEM_DATA_DIR": str(tmp_path / "data"),
                    "TRAINER_MAX_JOB_MEMORY_BYTES": str(JOB_MEMORY),
                },
                tmp_path / "trainer.log",
            ),
            "inference": start_server(
                stack,
                "inference",
                "infer_svc",
                {
                    "REDIS_URL": infer_redis.url,
                    "INFER_LISTEN": f"127.0.0.1:{infer_port}",
                    "INFER_HTTP_LISTEN": "127.0.0.1:0",
                    "INFER_METRICS_PORT": "0",
                    "INFER_GRACE_SECONDS": str(GRACE),
                },
                tmp_path / "inference.log",
            ),
        }
        job_id = reference_job(servers["trainer"])
        methods = {name: served_methods(server.channel) for name, server in servers.items()}
        for name, expected in EXPECTED_SERVICES.items():
            served = {method.containing_service.full_name for method in methods[name]}
            assert expected <= served, f"{name}'s reflection lists {sorted(served)}"

        # Before: the served model loads on its first Predict (any model is served on first use).
        answers(servers, job_id)
        wait_until(servers["inference"].serving, "the inference server to serve", STARTUP)
        before = answers(servers, job_id)
        memory = {name: {"before": server.memory()} for name, server in servers.items()}

        fuzz_started = time.monotonic()
        record = fuzz(servers, methods, seeds(job_id), job_id)
        record.seconds = time.monotonic() - fuzz_started

        after = answers(servers, job_id)
        for name, server in servers.items():
            memory[name]["after"] = server.memory()
            if not server.frozen and not server.serving():
                problems.append(f"{name}: not SERVING after the fuzz")
        problems += compare(before, after)
        deadline = time.monotonic() + GRACE + STOP_SLACK
        for server in servers.values():
            server.channel.close()
            server.process.send_signal(signal.SIGTERM)
        stops = [server.stopped(deadline) for server in servers.values()]  # each server waited for
        problems += [problem for problem in stops if problem is not None]
        log_notes = []
        for name, server in servers.items():
            bad, failed_jobs = handler_tracebacks(server.log)
            problems += [f"{name} logged a traceback:\n{entry[-3000:]}" for entry in bad]
            log_notes.append(
                f"{name} log: {len(failed_jobs)} failed jobs{': ' if failed_jobs else ''}"
                + "; ".join(sorted(set(failed_jobs))[:10])
            )
        for (name, store), blob in blobs.items():
            if store.get_blob(name, 1) != blob:
                problems.append(f"checkpoint {name} v1 changed in Redis")
            store.get(name, 1)  # and it still verifies
        for name, rss in memory.items():
            peak = rss["after"]["VmHWM"] - rss["before"]["VmRSS"]
            kept = rss["after"]["VmRSS"] - rss["before"]["VmRSS"]
            if peak > PEAK_GROWTH or kept > KEPT_GROWTH:
                problems.append(
                    f"{name}: RSS peak +{peak / MiB:.0f} MiB (bound {PEAK_GROWTH / MiB:.0f}), "
                    f"after +{kept / MiB:.0f} MiB (bound {KEPT_GROWTH / MiB:.0f})"
                )
        if record.sent < AT_LEAST:
            problems.append(f"only {record.sent:,} requests sent; the tier promises {AT_LEAST:,}")
        for name, server in servers.items():
            if server.frozen:
                problems.append(
                    f"{name} stopped answering: {server.late_calls} calls past their deadline, "
                    f"{record.skipped[name]} requests not sent"
                )

    report = table(record, memory, time.monotonic() - started, log_notes)
    print("\n" + report)
    problems = [problem for problem in problems if problem] + record.failure_report()
    assert not problems, "\n".join([report, f"{len(problems)} problems:", *problems])


def reference_job(trainer: Server) -> str:
    """Start a small job, cancel it, and wait until it has ended: a real job id for the fuzz."""
    job = trainer.unary(
        "/tandem.v1.Trainer/StartJob",
        trainer_pb.StartJobRequest(
            model_name=REFERENCE_JOB_MODEL,
            preset="mlp",
            hidden=[8],
            dataset="digits",
            hyperparameters=trainer_pb.Hyperparameters(epochs=1, seed=0),
        ),
        trainer_pb.Job,
    )
    trainer.unary(
        "/tandem.v1.Trainer/CancelJob", trainer_pb.CancelJobRequest(job_id=job.job_id), trainer_pb.Job
    )
    wait_until(
        lambda: (
            trainer.unary(
                "/tandem.v1.Trainer/GetJob", trainer_pb.GetJobRequest(job_id=job.job_id), trainer_pb.Job
            ).state
            == trainer_pb.JOB_STATE_CANCELLED
        ),
        "the reference job to be cancelled",
        STARTUP,
    )
    return job.job_id


def compare(before: dict, after: dict) -> list[str]:
    """The known-good answers must be the same; every dataset listed before must still be, the same."""
    problems = []
    for key, answer in before.items():
        if after.get(key) != answer:
            errors = [
                value for other, value in after.items() if other[:2] == key[:2] and isinstance(value, str)
            ]
            shown = f"{after.get(key, errors or 'not listed')}"[:500]
            problems.append(
                f"{key[0]} {key[1]} answers differently after the fuzz: "
                f"before {f'{answer}'[:500]!r}, after {shown!r}"
            )
    return problems


def fuzz(
    servers: dict[str, Server],
    methods: dict[str, list[MethodDescriptor]],
    valid: dict[str, list[list[Message]]],
    job_id: str,
) -> Record:
    """Generate each method's share of REQUESTS and send them, IN_FLIGHT at a time."""
    record = Record()
    fuzzer = Fuzzer({**VOCABULARY, "job_id": [job_id, "abc:optimizer"]})
    targets = [(name, method) for name, listed in methods.items() for method in listed]
    weights = {path(method): 1 + field_count(method.input_type) for _, method in targets}
    slots = threading.BoundedSemaphore(IN_FLIGHT * 4)
    with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="fuzz") as pool:
        for name, method in targets:
            server, request_class = servers[name], message_class(method.input_type)
            count = max(PER_METHOD, round(REQUESTS * weights[path(method)] / sum(weights.values())))

            def send(request: FuzzRequest, server=server, method=method, request_class=request_class):
                try:
                    if server.frozen:
                        with record.lock:
                            record.skipped[server.name] += 1
                        return
                    outcome = call(server.channel, method, request, DEADLINE)
                    if outcome.status == "DEADLINE_EXCEEDED":
                        with record.lock:
                            server.late_calls += 1
                    record.add(
                        path(method),
                        request,
                        outcome,
                        judge(outcome, request, request_class),
                        lambda: request.describe(request_class),
                    )
                    cancel_started_job(server, method, outcome, record)
                except Exception as error:  # noqa: BLE001 - reported with the failures, not lost in a thread
                    record.add_error(path(method), error)
                finally:
                    slots.release()

            @settings(
                max_examples=count,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(fuzzer.requests(method, valid.get(path(method), [])))
            def submit(request: FuzzRequest) -> None:
                slots.acquire()
                pool.submit(send, request)

            submit()
    return record


def cancel_started_job(server: Server, method: MethodDescriptor, outcome: Outcome, record: Record) -> None:
    """A job the fuzz got started is cancelled at once, so that the trainer does not train for minutes."""
    if outcome.status != "OK" or method.output_type.full_name != trainer_pb.Job.DESCRIPTOR.full_name:
        return
    assert outcome.response is not None, f"{path(method)}: OK without a response"
    job = trainer_pb.Job.FromString(outcome.response)
    if job.state in (trainer_pb.JOB_STATE_QUEUED, trainer_pb.JOB_STATE_RUNNING):
        server.unary(
            "/tandem.v1.Trainer/CancelJob", trainer_pb.CancelJobRequest(job_id=job.job_id), trainer_pb.Job
        )
        with record.lock:
            record.cancelled_jobs += 1
