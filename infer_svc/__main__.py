"""`python -m infer_svc`: one inference server, or a supervisor of INFER_WORKERS of them."""

import os

# One BLAS thread per server process, unless told otherwise, set before NumPy loads (and
# inherited by the workers). A server's cores are taken by its gRPC threads and its other
# workers: BLAS threads of its own only fight them. Measured with `python -m bench serve`:
# a 256-row forward pass in a loaded server took 31.7 ms with OpenBLAS's default of one
# thread per core and 11.1 ms with one.
for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

from infer_svc.config import InferConfig  # noqa: E402 - after the BLAS setting above
from infer_svc.malloc import keep_freed_memory_for_reuse  # noqa: E402
from infer_svc.server import InferenceServer  # noqa: E402
from infer_svc.workers import Supervisor  # noqa: E402
from shared.rpc.server import configure_logging, run_until_signalled  # noqa: E402


def main() -> None:
    configure_logging()
    keep_freed_memory_for_reuse()  # a worker does it too: it is a process of its own
    config = InferConfig()
    if config.worker_processes > 1:
        raise SystemExit(Supervisor(config).run())
    run_until_signalled(InferenceServer(config).start())


if __name__ == "__main__":  # only as `python -m infer_svc`
    main()
