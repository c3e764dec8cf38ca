"""RequestValidator: a client's JobSubmission checked, and made a JobRequest, before any job exists.

Every field is checked, and a refusal (ValueError or LookupError) names the
field. Cheap checks come first, and nothing is allocated for the model: its
size and training memory are checked against the JobLimits from the shapes
that building it infers.
"""

from __future__ import annotations

from typing import Any

from shared.checkpoints.checkpoint import check_model_name
from shared.checkpoints.store import CheckpointNotFound, CheckpointStore
from shared.data import Dataset
from shared.nn import build_model
from shared.nn.presets import get_preset
from shared.nn.run import Hyperparameters, check_fits, prepare_optimizer
from trainer_svc.datasets import DatasetCatalog
from trainer_svc.jobs import JobRequest, JobSubmission, check_request_id
from trainer_svc.limits import JobLimits


class RequestValidator:
    def __init__(self, store: CheckpointStore, catalog: DatasetCatalog, limits: JobLimits):
        self._store, self._catalog, self._limits = store, catalog, limits

    def check(self, submission: JobSubmission) -> JobRequest:
        """The checked request; raise ValueError or LookupError naming the field."""
        check_model_name(submission.model_name)
        check_request_id(submission.request_id)
        dataset = self._catalog.load(submission.dataset)
        spec, hp = self._architecture(submission, dataset)
        model = build_model(spec, dtype=hp.dtype)  # shapes only: no weights yet
        train_samples = int(len(dataset.y_train) * (1 - hp.validation_split))
        if hp.batch_size > train_samples:
            raise ValueError(
                f"hyperparameters.batch_size {hp.batch_size} is larger than the "
                f"{train_samples} training samples of {dataset.name!r}"
            )
        self._limits.check_job(
            model,
            hp.batch_size,
            len(prepare_optimizer(model, hp).slots),
            steps=hp.epochs * -(-train_samples // hp.batch_size),
        )
        check_fits(model, dataset, hp)
        spec = model.spec
        if submission.checkpoint_every_steps < 0:
            raise ValueError("checkpoint_schedule.every_steps must be >= 0")
        if submission.resume_from_version:
            self._check_resumable(submission, spec)
        return JobRequest(
            model_name=submission.model_name,
            dataset=dataset.name,
            spec=spec,
            hyperparameters=hp,
            preset=submission.preset,
            hidden=submission.hidden,
            checkpoint_every_steps=submission.checkpoint_every_steps,
            checkpoint_every_epoch=submission.checkpoint_every_epoch,
            resume_from_version=submission.resume_from_version,
            request_id=submission.request_id,
        )

    def _architecture(self, submission: JobSubmission, dataset: Dataset) -> tuple[Any, Hyperparameters]:
        """The spec (a preset's, or the client's JSON parsed within the limits; build_model checks
        it) and the hyperparameters."""
        preset, spec_json, hidden = submission.preset, submission.spec_json, submission.hidden
        if bool(preset) == (spec_json is not None):
            raise ValueError("architecture: give exactly one of preset or spec_json")
        if spec_json is None:  # a preset, then
            if hidden:  # a preset's spec has two layers per hidden width, and three more
                self._limits.check_layer_count(2 * len(hidden) + 3)
            return (
                get_preset(preset).spec(dataset.input_shape, dataset.num_classes, hidden or None),
                Hyperparameters.for_preset(preset, **submission.hyperparameters),
            )
        if hidden:
            raise ValueError("hidden: only a preset takes hidden-layer widths; a spec states its own")
        spec = self._limits.parse_spec(spec_json)
        if isinstance(spec, dict) and isinstance(spec.get("layers"), list):
            self._limits.check_layer_count(len(spec["layers"]))
        return spec, Hyperparameters.from_dict(submission.hyperparameters)

    def _check_resumable(self, submission: JobSubmission, spec: dict) -> None:
        """The checkpoint to resume from exists and has this job's architecture."""
        version = submission.resume_from_version
        try:
            meta = self._store.get(submission.model_name, version).meta
        except CheckpointNotFound as error:
            raise CheckpointNotFound(f"resume_from_version {version}: {error}") from None
        if meta.spec != spec:
            raise ValueError(
                f"resume_from_version {version} of {submission.model_name!r} "
                f"has another architecture than this job"
            )
