"""`python -m bench [name ...]`: run the named benchmarks, or all of them.

Environment: BENCH_THREADS (default 1) sets the thread count for NumPy's
BLAS and for torch (`speed` measures 1 and 2 threads unless it is set);
BENCH_QUICK=1 makes every benchmark shorter. Results go to stdout and to
bench/results/<name>.json; a run that includes speed, store or serve ends
with the summary of every aim (bench.summary: bench/results/summary.md and
summary.json).
"""

import argparse

from bench import accuracy, pool_speed, security_speed, serve_speed, store_speed, summary, train_speed

BENCHMARKS = {  # name -> function that runs it
    "speed": train_speed.run,
    "store": store_speed.run,
    "serve": serve_speed.run,  # the service as deployed vs 1 worker, no batching, the forward, MLServer
    "security": security_speed.run,  # TLS, mutual TLS and the token check, per request
    "pool": pool_speed.run,  # the trainer pool: jobs/hour of 1 trainer vs 3, take-over after SIGKILL
    "accuracy": accuracy.run,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run Tandem's benchmarks.",
        epilog="BENCH_THREADS=n sets the thread count (default 1); BENCH_QUICK=1 shortens every run.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"benchmarks to run, default all: {', '.join(BENCHMARKS)}"
    )
    names = parser.parse_args(argv).names or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    for name in names:
        BENCHMARKS[name]()
    if set(names) & set(summary.SOURCES):
        summary.run()


if __name__ == "__main__":
    main()
