"""The trainer's Prometheus metrics, served over HTTP by `trainer_svc.server`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.checkpoints.store import ReplicationShortfall, log_shortfall

STEPS = Counter("tandem_trainer_steps", "Training steps run, over all jobs")
SAMPLES_PER_SECOND = Gauge(
    "tandem_trainer_samples_per_second", "Training throughput (samples/s) of the job that reported last"
)
PUBLISH_SECONDS = Histogram(
    "tandem_trainer_checkpoint_publish_seconds",
    "Time to encode and publish one checkpoint to Redis",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PUBLISH_FAILURES = Counter(
    "tandem_trainer_checkpoint_publish_failures",
    "Checkpoint publish attempts that failed (Redis unavailable)",
)
UNREPLICATED = Counter(
    "tandem_trainer_checkpoints_unreplicated",
    "Published checkpoints that fewer replicas acknowledged than REDIS_MIN_REPLICAS_ACK asks for",
)

JOBS_OWNED = Gauge("tandem_trainer_jobs_owned", "Jobs this trainer holds the lease of (trainer pool)")
LEASES_RENEWED = Counter("tandem_trainer_leases_renewed", "Job leases this trainer renewed")
LEASES_LOST = Counter(
    "tandem_trainer_leases_lost", "Jobs this trainer stopped because another trainer took them over"
)
TAKEN_OVER = Counter(
    "tandem_trainer_jobs_taken_over", "Jobs this trainer took that a trainer had held before"
)
ORPHANS_REQUEUED = Counter(
    "tandem_trainer_orphans_requeued", "Unfinished jobs without an owner that this trainer queued again"
)


class JobStates(Collector):
    """`tandem_trainer_jobs{state=...}`, counted from the job records at scrape time."""

    def __init__(self, states: Callable[[], Iterable[str]]):
        self._states = states

    def collect(self):
        family = GaugeMetricFamily("tandem_trainer_jobs", "Jobs by state", labels=["state"])
        counts: dict[str, int] = {}
        for state in self._states():
            counts[state] = counts.get(state, 0) + 1
        for state, count in sorted(counts.items()):
            family.add_metric([state], count)
        yield family


def register_job_states(states: Callable[[], Iterable[str]]) -> JobStates:
    collector = JobStates(states)
    REGISTRY.register(collector)
    return collector


def unregister_job_states(collector: JobStates) -> None:
    REGISTRY.unregister(collector)


def record_unreplicated(shortfall: ReplicationShortfall) -> None:
    """A publish short of replicas: counted here, and logged as the store does by default."""
    UNREPLICATED.inc()
    log_shortfall(shortfall)
