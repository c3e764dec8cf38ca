"""The inference service's Prometheus metrics, served over HTTP by `infer_svc.server`.

Requests are counted and timed by `observed`, which decorates the two
inference methods (Predict, ModelInfer); the batcher and the registry
report through the `record_*` callbacks the server hands them.
"""

from __future__ import annotations

import functools
import threading
import time

import grpc
from prometheus_client import Counter, Gauge, Histogram

from infer_svc.batching import BatchStats
from infer_svc.servable import Servable

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

REQUESTS = Counter(
    "tandem_infer_requests",
    'Inference requests by method, model ("" for one not loaded), answering version and status',
    ["method", "model", "version", "status"],
)
REQUEST_SECONDS = Histogram(
    "tandem_infer_request_seconds",
    "Time to answer an inference request, from receipt",
    ["method"],
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


def observed(version_field: str):
    """Count and time an inference method of a servicer that has a `registry`.

    Put it above `translate_errors`, so that a failed call shows the status it
    was answered with. `version_field` names the response field that holds the
    answering version. Only loaded models get a label of their own: names
    clients make up must not create new time series.
    """

    def decorate(method):
        @functools.wraps(method)
        def wrapper(servicer, request, context):
            started = time.perf_counter()
            response = None
            PENDING.inc()
            try:
                response = method(servicer, request, context)
                return response
            finally:
                PENDING.dec()
                status = (
                    grpc.StatusCode.OK
                    if response is not None
                    else (context.code() or grpc.StatusCode.UNKNOWN)
                )
                model = request.model_name if request.model_name in servicer.registry.served() else ""
                version = str(getattr(response, version_field)) if response is not None else ""
                REQUESTS.labels(method.__name__, model, version, status.name).inc()
                REQUEST_SECONDS.labels(method.__name__).observe(time.perf_counter() - started)

        return wrapper

    return decorate
