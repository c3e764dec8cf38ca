"""Training jobs as data: what a client asked for (JobSubmission, unchecked), what was
checked (JobRequest), and where a job stands (JobRecord).

A JobRequest and a JobRecord are plain JSON-serialisable data, so a record
survives in Redis and a restarted trainer can list and resume its jobs.
Nothing here knows gRPC.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

from shared.nn.run import Hyperparameters

JOB_ID = re.compile(r"[0-9a-f]{16}")  # what JobRecord.new makes
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


def is_job_id(text: str) -> bool:
    """Whether `text` can name a job: checked before it becomes part of a Redis key."""
    return bool(JOB_ID.fullmatch(text))


def check_request_id(text: str) -> str:
    if text and not REQUEST_ID.fullmatch(text):
        raise ValueError(
            f"request_id must be 1-128 printable ASCII characters without spaces, got {text[:140]!r}"
        )
    return text


class JobState(str, Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"  # stopped by a trainer shutdown; resumed when a trainer starts
    CANCELLING = "CANCELLING"  # asked to cancel; stops at its next step boundary

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobSubmission:
    """A job as a client states it, not checked yet; `RequestValidator.check` makes a JobRequest of it."""

    model_name: str
    dataset: str
    preset: str = ""
    spec_json: str | None = None  # the spec as the client sent it, not parsed yet
    hidden: tuple[int, ...] = ()
    hyperparameters: dict = field(default_factory=dict)  # only the settings given
    checkpoint_every_steps: int = 0
    checkpoint_every_epoch: bool = True
    resume_from_version: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class JobRequest:
    """A checked request: the spec is resolved (from a preset if one was named) and valid."""

    model_name: str
    dataset: str
    spec: dict
    hyperparameters: Hyperparameters
    preset: str = ""
    hidden: tuple[int, ...] = ()  # the preset's widths as asked for (the spec has them too)
    checkpoint_every_steps: int = 0  # 0: not by steps
    checkpoint_every_epoch: bool = True
    resume_from_version: int = 0  # 0: start fresh
    request_id: str = ""  # the client's idempotency key, if it gave one

    def as_dict(self) -> dict:
        data = asdict(self)
        data["hyperparameters"] = self.hyperparameters.as_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobRequest:
        return cls(
            **{
                **data,
                "hidden": tuple(data.get("hidden", ())),
                "hyperparameters": Hyperparameters.from_dict(data["hyperparameters"]),
            }
        )


@dataclass
class JobRecord:
    job_id: str
    request: JobRequest
    state: JobState = JobState.QUEUED
    epoch: int = 0
    step: int = 0
    steps_total: int = 0
    samples_per_second: float = 0.0
    history: list[dict] = field(default_factory=list)  # every finished epoch's metrics
    stop_reason: str = ""
    last_published_version: int = 0
    last_published_step: int = 0
    error: str = ""
    restarts: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    # The identity that started it (shared.security.auth); "" with auth off, and in records made
    # before owners.
    owner: str = ""
    # The trainer replica (trainer_svc.pool.replica_id) that holds, or last held, the job.
    trainer: str = ""

    @classmethod
    def new(cls, request: JobRequest, owner: str = "") -> JobRecord:
        return cls(job_id=uuid.uuid4().hex[:16], request=request, owner=owner)

    @property
    def model_name(self) -> str:
        return self.request.model_name

    @property
    def last_metrics(self) -> dict:
        return self.history[-1] if self.history else {}

    def copy(self) -> JobRecord:
        return replace(self, history=list(self.history))

    def to_json(self) -> str:
        data = asdict(self)
        data["request"] = self.request.as_dict()
        data["state"] = self.state.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        data = json.loads(text)
        data["request"] = JobRequest.from_dict(data["request"])
        data["state"] = JobState(data["state"])
        return cls(**data)
