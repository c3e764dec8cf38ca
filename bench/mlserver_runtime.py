"""An MLServer runtime serving a Tandem checkpoint through Tandem's own forward pass.

Runs inside MLServer, in its virtual environment (.venv-mlserver, `make bench`), not
in the project's: the serving benchmark (bench/mlserver_peer.py) points a
model-settings.json's "implementation" at `TandemRuntime` and its parameters.uri at a
checkpoint file it wrote with shared.checkpoints.checkpoint.save. The answer is
`Servable.probabilities`, the very forward and softmax the inference service runs,
so the comparison times the servers, not two models.
"""

from __future__ import annotations

# mlserver is installed in .venv-mlserver only: not found where mypy runs (and the ignore is
# unused where it is installed).
from mlserver import MLModel  # type: ignore[import-not-found, unused-ignore]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found, unused-ignore]
from mlserver.types import InferenceRequest, InferenceResponse  # type: ignore[import-not-found, unused-ignore]

from infer_svc.servable import Servable
from shared.checkpoints.checkpoint import load

OUTPUT = "probabilities"  # the output's name, as Tandem's KServe endpoint names it


class TandemRuntime(MLModel):
    async def load(self) -> bool:
        checkpoint = load(self.settings.parameters.uri)
        meta = checkpoint.meta
        self._servable = Servable(meta.model_name, meta.version or 1, checkpoint.model, meta)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        probabilities = self._servable.probabilities(x.astype(self._servable.model.dtype, copy=False))
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output(OUTPUT, probabilities)]
        )
