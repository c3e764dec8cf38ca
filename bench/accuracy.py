"""The seeds' models trained in full: final test accuracy against the published figures.

Fashion-MNIST needs Debian's `dataset-fashion-mnist`; without it those rows
are reported as skipped. BENCH_QUICK=1 runs the digits CNN only.
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import (
    bench_threads,
    limited_threads,
    machine_facts,
    print_facts,
    print_table,
    quick_mode,
    write_json,
)
from shared.data import DatasetNotFound, load_dataset
from shared.nn.presets import get_preset
from shared.nn.run import Hyperparameters, train

# (preset, dataset, seeds, aim, where the aim comes from)
RUNS = [
    ("digits-cnn", "digits", (0, 1, 2), 0.988, "seed 002's article: 98.3 %, one 90/10 split"),
    ("two-layer-net", "fashion-mnist", (0,), None, "book: 96.9 % on MNIST digits (easier)"),
    ("mlp", "fashion-mnist", (0,), 0.89, "Fashion-MNIST table: MLP 256-128-100 88.3 %"),
    ("cnn", "fashion-mnist", (0,), 0.915, "Fashion-MNIST table: 2 conv + pooling up to 91.6 %"),
    ("fashion-mlp", "fashion-mnist", (0,), 0.905, "Fashion-MNIST table: MLP 256-128-100 88.3 %"),
    ("fashion-cnn", "fashion-mnist", (0,), 0.935, "Fashion-MNIST table: 2 conv + pooling up to 91.6 %"),
]
MAX_SECONDS = {"fashion-cnn": 20 * 60}  # the budget for one run at BENCH_THREADS=2


def train_once(preset: str, dataset, seed: int) -> tuple[float, float]:
    """(final test accuracy, seconds) of one preset run with the preset's settings."""
    spec = get_preset(preset).spec(dataset.input_shape, dataset.num_classes)
    started = time.perf_counter()
    trained = train(spec, dataset, Hyperparameters.for_preset(preset, seed=seed))
    return trained.history.epochs[-1]["test_accuracy"], time.perf_counter() - started


def run() -> None:
    threads = bench_threads()
    facts = machine_facts(threads)
    print_facts("Seed models, trained in full (float32)", facts)
    runs = RUNS[:1] if quick_mode() else RUNS
    rows: list[list] = []
    results: list[dict] = []
    with limited_threads(threads):
        for preset, name, seeds, aim, source in runs:
            try:
                dataset = load_dataset(name)
            except DatasetNotFound:
                rows.append([preset, name, "-", "-", "-", "skipped: dataset not installed", source])
                continue
            outcomes = [train_once(preset, dataset, seed) for seed in seeds]
            accuracy = float(np.mean([acc for acc, _ in outcomes]))
            seconds = float(np.mean([sec for _, sec in outcomes]))
            budget = MAX_SECONDS.get(preset)
            within = budget is None or seconds <= budget
            mark = "-" if aim is None else ("pass" if accuracy >= aim and within else "MISS")
            aim_text = "" if aim is None else f" (aim {aim:.1%}" + (f" in {budget} s)" if budget else ")")
            rows.append(
                [preset, name, len(seeds), f"{accuracy:.2%}", f"{seconds:.0f}", mark + aim_text, source]
            )
            results.append(
                {
                    "preset": preset,
                    "dataset": name,
                    "seeds": list(seeds),
                    "accuracies": [acc for acc, _ in outcomes],
                    "mean_accuracy": accuracy,
                    "seconds_per_run": seconds,
                    "aim": aim,
                    "max_seconds": budget,
                    "source": source,
                }
            )
    print()
    print_table(["preset", "dataset", "seeds", "test accuracy (mean)", "s per run", "aim", "reference"], rows)
    print(f"\nwrote {write_json('accuracy', {'facts': facts, 'runs': results})}")
