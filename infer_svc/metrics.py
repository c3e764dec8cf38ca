"""The inference service's Prometheus metrics, served over HTTP by `infer_svc.server`.

Requests are counted and timed by `observed_request`, around each inference
request of either transport (the gRPC methods Predict and ModelInfer, through
the `observed` decorator; ModelInfer over HTTP, infer_svc.http), labelled with
the protocol ("grpc", "http") and a status in one vocabulary for both, gRPC's
code names (OK, INVALID_ARGUMENT, ...). The batcher and the registry report
through the `record_*` callbacks the server hands them.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Gauge, Histogram

from infer_svc.batching import BatchStats
from infer_svc.servable import Servable

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

REQUESTS = Counter(
    "tandem_infer_requests",
    'Inference requests by protocol (grpc, http), method, model ("" for one not loaded), answering '
    "version and status (gRPC's code names, for both protocols)",
    ["protocol", "method", "model", "version", "status"],
)
REQUEST_SECONDS = Histogram(
    "tandem_infer_request_seconds",
    "Time to answer an inference request, from receipt",
    ["protocol", "method"],
    buckets=SECONDS,
)
# With INFER_WORKERS, each gauge is the workers' values combined (prometheus-client's
# multiprocess mode): pending requests add up; a model's version is the newest any worker serves.
PENDING = Gauge(
    "tandem_infer_pending_requests",
    "Inference requests being answered (queued or computing)",
    multiprocess_mode="livesum",
)
QUEUE_SECONDS = Histogram(
    "tandem_infer_queue_seconds",
    "How long the oldest request of a forward pass waited in the batching queue",
    buckets=SECONDS,
)
COMPUTE_SECONDS = Histogram("tandem_infer_compute_seconds", "Time of one forward pass", buckets=SECONDS)
BATCH_ROWS = Histogram(
    "tandem_infer_batch_rows",
    "Rows per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
BATCH_REQUESTS = Histogram(
    "tandem_infer_batch_requests", "Requests merged into one forward pass", buckets=(1, 2, 4, 8, 16, 32, 64)
)
MODEL_VERSION = Gauge(
    "tandem_infer_model_version", "The version each model serves", ["model"], multiprocess_mode="livemax"
)
LOADS = Counter(
    "tandem_infer_model_loads",
    "Model versions loaded, verified and warmed up (first loads, reloads, versions asked for by number)",
    ["model"],
)
LOAD_FAILURES = Counter(
    "tandem_infer_model_load_failures",
    "Model versions that failed verification and were not served, each counted "
    "once (a failed version is not fetched again)",
    ["model"],
)
FAILED_VERSION = Gauge(
    "tandem_infer_model_failed_version",
    "The newest version of each model that failed verification; above "
    "tandem_infer_model_version, the model serves an older version than its newest",
    ["model"],
    multiprocess_mode="max",
)
_newest_failed: dict[str, int] = {}  # FAILED_VERSION's values, to keep the newest of concurrent failures
_newest_failed_lock = threading.Lock()


def record_batch(stats: BatchStats) -> None:
    QUEUE_SECONDS.observe(stats.queue_seconds)
    COMPUTE_SECONDS.observe(stats.compute_seconds)
    BATCH_ROWS.observe(stats.rows)
    BATCH_REQUESTS.observe(stats.requests)


def record_loaded(servable: Servable) -> None:
    LOADS.labels(servable.name).inc()


def record_failed(name: str, version: int, error: Exception) -> None:
    LOAD_FAILURES.labels(name).inc()
    with _newest_failed_lock:  # a fallback fails newest first, so the newest is not always the last
        _newest_failed[name] = max(version, _newest_failed.get(name, 0))
        FAILED_VERSION.labels(name).set(_newest_failed[name])


def record_swapped(servable: Servable) -> None:
    MODEL_VERSION.labels(servable.name).set(servable.version)


@dataclass
class Observation:
    """What an inference request turned out to be, filled in as the transport learns it."""

    model_name: str = ""
    version: str = ""  # the answering version; "" for a request not answered
    status: str = "UNKNOWN"  # a gRPC code name


@contextmanager
def observed_request(protocol: str, method: str, registry) -> Iterator[Observation]:
    """Count and time one inference request, pending while it runs, by the Observation it fills in.

    `registry` (infer_svc.registry.Registry): only loaded models get a label of
    their own, so that names clients make up create no new time series.
    """
    started = time.perf_counter()
    observation = Observation()
    PENDING.inc()
    try:
        yield observation
    finally:
        PENDING.dec()
        model = observation.model_name if observation.model_name in registry.served() else ""
        REQUESTS.labels(protocol, method, model, observation.version, observation.status).inc()
        REQUEST_SECONDS.labels(protocol, method).observe(time.perf_counter() - started)


def observed(version_field: str):
    """Count and time an inference method of a gRPC servicer that has a `registry`.

    Put it above `translate_errors`, so that a failed call shows the status it
    was answered with. `version_field` names the response field that holds the
    answering version.
    """

    def decorate(method):
        @functools.wraps(method)
        def wrapper(servicer, request, context):
            with observed_request("grpc", method.__name__, servicer.registry) as observation:
                observation.model_name = request.model_name
                try:
                    response = method(servicer, request, context)
                except BaseException:
                    observation.status = (context.code() or grpc.StatusCode.UNKNOWN).name
                    raise
                observation.version, observation.status = str(getattr(response, version_field)), "OK"
                return response

        return wrapper

    return decorate
