"""`python -m infer_svc`: one inference server, or a supervisor of INFER_WORKERS of them."""

from infer_svc.config import InferConfig
from infer_svc.server import InferenceServer
from infer_svc.workers import Supervisor
from shared.rpc.server import configure_logging, run_until_signalled


def main() -> None:
    configure_logging()
    config = InferConfig()
    if config.worker_processes > 1:
        raise SystemExit(Supervisor(config, config.worker_processes).run())
    run_until_signalled(InferenceServer(config).start())


if __name__ == "__main__":  # not when a worker process (spawned) imports this module again
    main()
