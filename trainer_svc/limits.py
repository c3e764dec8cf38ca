"""What one StartJob may ask of the trainer, checked before anything is allocated for it.

A spec arrives as JSON text: its size and nesting depth are checked on the
text itself (json.loads of a 100,000-deep document is a RecursionError, and
every level costs memory), its layer count before any layer is built, and
the model's parameter count and estimated training memory from the shapes
that building infers (shared.nn.cost), before any weight exists. Each limit
is an environment variable (LIMIT_VARIABLES); the defaults let a 2-core,
24 GiB machine run TRAINER_MAX_CONCURRENT_JOBS=4 jobs at the limits at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields

from shared.env import env
from shared.limits import check_limit
from shared.nn import Model, SpecError
from shared.nn.cost import parameter_count, training_memory_bytes

LIMIT_VARIABLES = {
    "spec_characters": "TRAINER_MAX_SPEC_CHARACTERS",
    "spec_depth": "TRAINER_MAX_SPEC_DEPTH",
    "layers": "TRAINER_MAX_LAYERS",
    "parameters": "TRAINER_MAX_PARAMETERS",
    "memory_bytes": "TRAINER_MAX_JOB_MEMORY_BYTES",
    "batch_size": "TRAINER_MAX_BATCH_SIZE",
    "steps": "TRAINER_MAX_STEPS",
}
# A JSON string (skipped whole, so brackets inside it do not count) or one bracket.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


@dataclass(frozen=True)
class JobLimits:
    spec_characters: int = 256 * 2**10  # a 1,000-layer spec is about 100 KiB
    spec_depth: int = 16  # a spec needs 4 ({"layers": [{"stride": [2, 2]}]})
    layers: int = 1000
    parameters: int = 50_000_000  # 200 MB of float32 weights; the cnn preset has 0.4 M
    memory_bytes: int = 4 * 2**30  # estimated peak of one job (shared.nn.cost)
    batch_size: int = 8192
    steps: int = 10_000_000  # epochs x steps per epoch: days of training at the most

    def __post_init__(self):
        for limit in fields(self):  # a limit of 0 or less would refuse every job: a setting's typo
            if getattr(self, limit.name) < 1:
                raise ValueError(
                    f"{LIMIT_VARIABLES[limit.name]} must be at least 1, got {getattr(self, limit.name)}"
                )

    @classmethod
    def from_env(cls) -> JobLimits:
        return cls(**{f.name: env(LIMIT_VARIABLES[f.name], f.default, int) for f in fields(cls)})

    def parse_spec(self, text: str) -> object:
        """The spec JSON's value, after its size and nesting depth were found within the limits."""
        check_limit(
            "spec_json", len(text), self.spec_characters, LIMIT_VARIABLES["spec_characters"], "characters"
        )
        depth = deepest = 0
        for match in _STRING_OR_BRACKET.finditer(text):
            token = match.group()
            if token in "[{":
                depth += 1
                deepest = max(deepest, depth)
            elif token in "]}":
                depth -= 1
        check_limit("spec_json's nesting depth", deepest, self.spec_depth, LIMIT_VARIABLES["spec_depth"])
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"spec_json is not valid JSON: {error}") from None

    def check_layer_count(self, count: int) -> None:
        check_limit("the spec's layer count", count, self.layers, LIMIT_VARIABLES["layers"])

    def check_job(self, model: Model, batch_size: int, optimizer_slots: int, steps: int) -> None:
        """The built (not initialised) model's size and the run's length against the limits."""
        check_limit("hyperparameters.batch_size", batch_size, self.batch_size, LIMIT_VARIABLES["batch_size"])
        check_limit(
            "the model's parameter count",
            parameter_count(model),
            self.parameters,
            LIMIT_VARIABLES["parameters"],
        )
        check_limit(
            "the job's estimated training memory",
            training_memory_bytes(model, batch_size, optimizer_slots),
            self.memory_bytes,
            LIMIT_VARIABLES["memory_bytes"],
            "bytes",
        )
        check_limit("the job's steps (epochs x steps per epoch)", steps, self.steps, LIMIT_VARIABLES["steps"])
