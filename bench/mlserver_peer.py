"""Seldon MLServer as the serving benchmark's peer: the same checkpoint, served by MLServer.

MLServer lives in a virtual environment of its own, .venv-mlserver (`make bench`
builds it from requirements/bench-mlserver.txt), so that its pins never touch the
project's grpcio and protobuf; without it the comparison is skipped. Each setting
runs as an `mlserver start` subprocess on a folder this module writes: settings.json
(ports, parallel_workers) and the model's model-settings.json, whose runtime,
bench.mlserver_runtime.TandemRuntime, answers with Tandem's own forward pass on the
checkpoint file the bench wrote, and whose max_batch_size / max_batch_time turn
MLServer's adaptive batching on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.service_process import ServiceProcess, poll_until
from shared.embedded.redis_server import free_loopback_port

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-mlserver"
VERSION = "1.7.1"
INSTALL_HINT = "make .venv-mlserver/.installed (part of `make bench`; requirements/bench-mlserver.txt)"
# Adaptive batching, when on: up to 64 rows (Tandem's default batch), waiting up to 2 ms.
BATCH_ROWS, BATCH_SECONDS = 64, 0.002


@dataclass(frozen=True)
class Setting:
    parallel_workers: int  # 0: the model runs in the server's own process
    batching: bool  # adaptive batching (max_batch_size BATCH_ROWS, max_batch_time BATCH_SECONDS)

    @property
    def name(self) -> str:
        batching = f"batch {BATCH_ROWS} / {BATCH_SECONDS * 1e3:g} ms" if self.batching else "no batching"
        return f"MLServer workers {self.parallel_workers}, {batching}"

    @property
    def is_default(self) -> bool:
        """MLServer 1.7.1's defaults: parallel_workers 1, max_batch_size 0 (no batching)."""
        return self.parallel_workers == 1 and not self.batching


SETTINGS = tuple(Setting(workers, batching) for workers in (0, 1, 2) for batching in (False, True))


def installed() -> bool:
    return (VENV / "bin" / "mlserver").exists()


def _write_repository(folder: Path, setting: Setting, model: str, checkpoint: Path, ports: dict) -> None:
    """MLServer's settings.json and the model's model-settings.json, in `folder`."""
    (folder / model).mkdir(parents=True)
    server = {"host": "127.0.0.1", "parallel_workers": setting.parallel_workers, **ports}
    (folder / "settings.json").write_text(json.dumps(server))
    model_settings = {
        "name": model,
        "implementation": "bench.mlserver_runtime.TandemRuntime",
        "parameters": {"uri": str(checkpoint)},
        "max_batch_size": BATCH_ROWS if setting.batching else 0,
        "max_batch_time": BATCH_SECONDS if setting.batching else 0.0,
    }
    (folder / model / "model-settings.json").write_text(json.dumps(model_settings))


def mlserver(setting: Setting, model: str, checkpoint: Path, work_dir: Path) -> tuple[str, ServiceProcess]:
    """MLServer with `setting`, serving `checkpoint` as `model`, started (its ServiceProcess
    waits for it to serve the model); its gRPC address and its process."""
    import tritonclient.grpc as triton

    name = f"mlserver-w{setting.parallel_workers}-{'batching' if setting.batching else 'plain'}"
    folder = work_dir / name
    ports = {name: free_loopback_port() for name in ("grpc_port", "http_port", "metrics_port")}
    _write_repository(folder, setting, model, checkpoint, ports)
    address = f"127.0.0.1:{ports['grpc_port']}"
    # bench.mlserver_runtime (and the `shared` it imports) from this tree, in the server
    # and in its worker processes.
    env = {"PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(work_dir)}

    def wait_ready(service: ServiceProcess, seconds: float) -> None:
        client = triton.InferenceServerClient(address)

        def ready() -> bool:
            if service.process.poll() is not None:
                raise RuntimeError("exited")
            try:
                return bool(client.is_model_ready(model, client_timeout=2))
            except triton.InferenceServerException:
                return False  # not listening yet

        try:
            poll_until(ready, seconds, f"{name} serving {model}")
        finally:
            client.close()

    argv = [str(VENV / "bin" / "mlserver"), "start", str(folder)]
    return address, ServiceProcess(name, argv, env, work_dir, wait_ready, cwd=folder)
