"""What every benchmark shares: settings from the environment, thread control,
interleaved timing, machine facts, and printing and saving results.

Timing follows /work/shared/notes/numpy-speed.md: this is a shared 2-core
machine, so a benchmark sets its thread count explicitly and times the
things it compares in alternating blocks within one run, reporting medians.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

RESULTS_DIR = Path(__file__).parent / "results"
Name = TypeVar("Name", bound=Hashable)  # what names a contender


# ---- settings ---------------------------------------------------------------


def bench_threads() -> int:
    """Threads for BLAS and PyTorch: env BENCH_THREADS, default 1."""
    value = os.environ.get("BENCH_THREADS", "1")
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"BENCH_THREADS must be a positive integer, got {value!r}")
    return int(value)


def quick_mode() -> bool:
    """True when env BENCH_QUICK=1: fewer and shorter timing rounds."""
    return os.environ.get("BENCH_QUICK", "0") == "1"


def import_torch():
    """The torch module, or None when the benchmark peer is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


@contextmanager
def limited_threads(threads: int):
    """Limit every BLAS/OpenMP pool (threadpoolctl) and, if torch has been
    imported, PyTorch's intra-op pool to `threads` for the block."""
    torch = sys.modules.get("torch")
    previous = torch.get_num_threads() if torch else None
    with threadpool_limits(limits=threads):
        if torch:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if torch:
                torch.set_num_threads(previous)


@contextmanager
def redis_session():
    """What a benchmark against Redis runs in: BLAS pools at `bench_threads()`, an embedded
    Redis of its own (or REDIS_URL's), and this machine's facts; yields (redis_url, facts)."""
    from shared.embedded.redis_server import redis_for_local_use

    threads = bench_threads()
    with limited_threads(threads), redis_for_local_use() as url:
        yield url, machine_facts(threads)


# ---- timing -----------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    rounds: int  # blocks timed per contender; the median is reported
    block_seconds: float  # length of one block (calls are counted to fill it)
    warmup_calls: int  # untimed calls before the first block


def seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def calls_per_block(fn: Callable[[], object], block_seconds: float, warmup_calls: int) -> int:
    """Warm `fn` up, then pick how many calls fill about `block_seconds`."""
    seconds_per_call(fn, warmup_calls)
    one_call = seconds_per_call(fn, max(1, warmup_calls // 2))
    return max(1, round(block_seconds / one_call))


def interleaved_medians(contenders: Mapping[Name, Callable[[], object]], timing: Timing) -> dict[Name, float]:
    """Median seconds per call of each contender, timed in alternating blocks.

    Each round times one block of every contender; the order reverses
    every round so no contender always runs right after the same
    neighbour. A slowdown from another process on the machine then hits
    all contenders alike instead of one of them.
    """
    calls = {
        name: calls_per_block(fn, timing.block_seconds, timing.warmup_calls)
        for name, fn in contenders.items()
    }
    samples: dict[Name, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_index in range(timing.rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            samples[name].append(seconds_per_call(contenders[name], calls[name]))
    return {name: statistics.median(times) for name, times in samples.items()}


@dataclass
class Block:
    """One timed block of a contender: rows answered, wall seconds, and each call's latency (s)."""

    rows: int
    seconds: float
    latencies: np.ndarray


@dataclass
class Contender:
    """Something timed in blocks (of many calls, or of concurrent clients): `run(seconds)`
    times one block. Summaries: throughput the median over blocks, latencies percentiles
    over every call of every block."""

    name: str
    run: Callable[[float], Block]
    blocks: list[Block] = field(default_factory=list)

    def time_block(self, seconds: float) -> None:
        self.blocks.append(self.run(seconds))

    def summary(self) -> dict:
        latencies = np.concatenate([b.latencies for b in self.blocks]) * 1e3
        return {
            "samples_per_s": statistics.median(b.rows / b.seconds for b in self.blocks),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "mean_ms": float(latencies.mean()),
            "calls": len(latencies),
        }


def interleave(contenders: list[Contender], timing: Timing) -> None:
    """Each round, one block of every contender; the order reverses every round (as in
    `interleaved_medians`)."""
    for round_index in range(timing.rounds):
        for contender in contenders if round_index % 2 == 0 else reversed(contenders):
            contender.time_block(timing.block_seconds)


# ---- machine facts ----------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _numpy_blas() -> str:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return f"{blas.get('name', '?')} {blas.get('version', '?')}"


def _describe_pool(pool: dict) -> str:
    """One threadpoolctl entry, e.g. 'openblas 0.3.31 SkylakeX pthreads, 1 thread(s): libopenblas.so'."""
    name = " ".join(
        str(pool[key])
        for key in ("internal_api", "version", "architecture", "threading_layer")
        if pool.get(key)
    )
    return f"{name}, {pool['num_threads']} thread(s): {Path(pool['filepath']).name}"


def machine_facts(threads: int) -> dict:
    """Versions, BLAS and CPU facts that a reader needs to judge the figures."""
    torch = sys.modules.get("torch")
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": _numpy_blas(),
        "thread_pools": [_describe_pool(pool) for pool in threadpool_info()],
        "torch": torch.__version__ if torch else "not installed",
        "threads": threads,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


# ---- output -----------------------------------------------------------------


def print_facts(title: str, facts: dict) -> None:
    print(title)
    for key, value in facts.items():
        for line in value if isinstance(value, list) else [value]:
            print(f"  {key:<18} {line}")
    print()


def print_table(headers: list[str], rows: list[list]) -> None:
    """A plain aligned table: text left-aligned, numbers right-aligned."""
    cells = [headers] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows if row[i] is not None)
        for i in range(len(headers))
    ]

    def line(row):
        return "  ".join(
            cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric, strict=True)
        ).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
    print()


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_json(name: str, result: dict) -> Path:
    """Save `result` as bench/results/<name>.json and return the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
