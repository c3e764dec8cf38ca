"""Training speed: samples/s of one full training step, ours against PyTorch, at 1 and 2 threads.

A step is what `shared.nn.fit` does per minibatch: forward, loss, backward
(`Model.train_step_gradients`) and the optimiser update. Each preset model
is timed in float32 on a fixed random batch, and, when torch is installed,
so is the same architecture in PyTorch, starting from the same weights,
with the same optimiser, learning rate, batch and thread count. The two
are timed in alternating blocks and compared by their medians.

One run measures every thread count of THREAD_COUNTS in turn (NumPy's BLAS
and torch both limited to it); BENCH_THREADS=n measures that count only.
Every row carries its aim (AIMS: ours / torch throughput, by kind of model)
and whether it met it.

Then, for the `cnn` preset, the time of our step is split by layer
(forward and backward of each layer, the loss and the optimiser step), at
each thread count.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from bench.common import (
    Timing,
    bench_threads,
    import_torch,
    interleaved_medians,
    limited_threads,
    machine_facts,
    print_facts,
    print_table,
    quick_mode,
    write_json,
)
from shared.nn import Model, build_model, make_optimizer
from shared.nn.layers import (
    GELU,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
)
from shared.nn.presets import get_preset

NUM_CLASSES = 10
SEED = 0
AIMS = {"mlp": 1.2, "cnn": 1.0}  # ours / torch throughput we aim for, by kind of model
THREAD_COUNTS = (1, 2)  # measured in one run unless BENCH_THREADS names one

# (throughput timing, per-layer breakdown timing); the full run takes about 2 minutes per thread count.
TIMINGS = {
    "full": (
        Timing(rounds=7, block_seconds=1.0, warmup_calls=10),
        Timing(rounds=7, block_seconds=0.2, warmup_calls=5),
    ),
    "quick": (
        Timing(rounds=3, block_seconds=0.25, warmup_calls=3),
        Timing(rounds=3, block_seconds=0.05, warmup_calls=2),
    ),
}


@dataclass(frozen=True)
class Case:
    """One model to time: a preset on an input shape, with its training settings."""

    preset: str
    input_shape: tuple[int, ...]
    kind: str  # "mlp" or "cnn", which sets the aim
    batch_size: int
    optimizer: str
    learning_rate: float

    @property
    def aim(self) -> float:
        return AIMS[self.kind]


def preset_case(preset: str, input_shape: tuple[int, ...], kind: str) -> Case:
    """A case with the batch size, optimiser and learning rate the preset was tuned with."""
    training = get_preset(preset).training
    return Case(
        preset, input_shape, kind, training["batch_size"], training["optimizer"], training["learning_rate"]
    )


CASES = (
    preset_case("two-layer-net", (1, 28, 28), "mlp"),  # 784-50-10, sigmoid, SGD, batch 100
    preset_case("mlp", (1, 28, 28), "mlp"),  # 784-256-128-100-10, Adam, batch 64
    preset_case("digits-cnn", (1, 8, 8), "cnn"),  # Adam, batch 32
    preset_case("fashion-cnn", (1, 28, 28), "cnn"),  # batchnorm and dropout; Adam, batch 64
    preset_case("cnn", (1, 28, 28), "cnn"),  # Adam, batch 64
)
BREAKDOWN_CASE = next(case for case in CASES if case.preset == "cnn")


# ---- our step ---------------------------------------------------------------


def build(case: Case) -> Model:
    spec = get_preset(case.preset).spec(case.input_shape, NUM_CLASSES)
    return build_model(spec, dtype=np.float32).initialise(SEED)


def random_batch(case: Case) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((case.batch_size, *case.input_shape), dtype=np.float32)
    return x, rng.integers(0, NUM_CLASSES, case.batch_size)


def numpy_step(case: Case, model: Model, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    optimizer = make_optimizer(case.optimizer, case.learning_rate)

    def step():  # the same dropout masks every step: drawing them costs the same
        model.train_step_gradients(x, y, step_seed=(SEED, 0))
        optimizer.step(model.parameters(), model.gradients())

    return step


# ---- the PyTorch peer -------------------------------------------------------


def _symmetric_padding(layer) -> tuple[int, int]:
    w = layer.window
    if (w.pad_top, w.pad_left) != (w.pad_bottom, w.pad_right):
        raise ValueError(f"torch cannot pad {layer.type_name} unevenly: {w}")
    return w.pad_top, w.pad_left


def torch_layer(layer, torch):
    """The PyTorch module computing the same as one of our layers, with its weights."""
    nn = torch.nn
    if isinstance(layer, Dense):
        module = nn.Linear(layer.input_shape[0], layer.units)
        weight, bias = layer.params["W"].T, layer.params["b"]  # ours is (in, out), torch's (out, in)
    elif isinstance(layer, Conv2D):
        module = nn.Conv2d(
            layer.input_shape[0],
            layer.filters,
            layer.window.kernel,
            layer.window.stride,
            padding=_symmetric_padding(layer),
        )
        weight, bias = layer.params["W"], layer.params["b"]  # (filters, channels, kh, kw) in both
    elif isinstance(layer, BatchNorm):
        norm = nn.BatchNorm1d if len(layer.input_shape) == 1 else nn.BatchNorm2d
        module = norm(layer.channels, eps=layer.eps, momentum=layer.momentum)
        weight, bias = layer.params["gamma"], layer.params["beta"]
    elif isinstance(layer, MaxPool2D):
        return nn.MaxPool2d(layer.window.kernel, layer.window.stride, padding=_symmetric_padding(layer))
    elif isinstance(layer, GlobalAvgPool):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    elif isinstance(layer, Dropout):
        return nn.Dropout(layer.rate)
    elif isinstance(layer, LeakyReLU):
        return nn.LeakyReLU(layer.negative_slope)
    elif isinstance(layer, GELU):
        return nn.GELU(approximate=layer.approximate)
    else:
        return {Flatten: nn.Flatten, ReLU: nn.ReLU, Sigmoid: nn.Sigmoid}[type(layer)]()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        module.bias.copy_(torch.from_numpy(bias))
    return module


def torch_step(case: Case, model: Model, x: np.ndarray, y: np.ndarray, torch) -> Callable[[], None]:
    """PyTorch's step on the same architecture, weights and batch as `model`.

    Refuses to time anything if the two models disagree on the loss, which
    would mean they are not the same network.
    """
    net = torch.nn.Sequential(*(torch_layer(layer, torch) for layer in model.layers))
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer_class = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[case.optimizer]
    optimizer = optimizer_class(net.parameters(), lr=case.learning_rate)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)

    with torch.no_grad():  # both in evaluation mode: no dropout, the running statistics
        theirs = float(loss_fn(net.eval()(x_t), y_t))
    net.train()
    ours = model.loss.forward(model.forward(x), y)
    if not np.isclose(ours, theirs, rtol=1e-4):
        raise RuntimeError(f"{case.preset}: torch peer's loss {theirs} differs from ours {ours}")

    def step():
        optimizer.zero_grad()
        loss_fn(net(x_t), y_t).backward()
        optimizer.step()

    return step


# ---- measurements -----------------------------------------------------------


def measure_throughput(cases, timing: Timing, torch=None) -> list[dict]:
    """Samples/s of our step (and torch's, if given) for each case."""
    results = []
    for case in cases:
        model = build(case)
        x, y = random_batch(case)
        steps: dict[str, Callable[[], object]] = {}
        if torch:  # built first: it copies the weights before our steps change them
            steps["torch"] = torch_step(case, model, x, y, torch)
        steps["ours"] = numpy_step(case, model, x, y)
        seconds = interleaved_medians(steps, timing)
        rate = {name: case.batch_size / s for name, s in seconds.items()}
        ratio = rate["ours"] / rate["torch"] if torch else None
        results.append(
            {
                "model": case.preset,
                "input_shape": list(case.input_shape),
                "batch_size": case.batch_size,
                "optimizer": f"{case.optimizer} lr {case.learning_rate:g}",
                "ours_samples_per_s": rate["ours"],
                "torch_samples_per_s": rate.get("torch"),
                "ratio": ratio,
                "aim": case.aim,
                "mark": None if ratio is None else "pass" if ratio >= case.aim else "MISS",
            }
        )
    return results


def layer_breakdown(case: Case, timing: Timing) -> list[dict]:
    """Milliseconds per step spent in each layer's forward and backward, the
    loss, and the optimiser step, each timed by calling it directly on the
    arrays one real step passes it; then their sum and a whole step."""
    model = build(case)
    x, y = random_batch(case)
    inputs = [x]  # inputs[i] is what layer i receives
    for layer in model.layers:
        inputs.append(layer.forward(inputs[-1], training=True))
    model.loss.forward(inputs[-1], y)
    # As Model.backward: back to the first layer with parameters, which skips its input's gradient.
    first = model.first_with_parameters()
    douts = {len(model.layers) - 1: model.loss.backward()}  # douts[i] is the gradient layer i receives
    for i in range(len(model.layers) - 1, first, -1):
        douts[i - 1] = model.layers[i].backward(douts[i])
    model.layers[first].backward_parameters(douts[first])
    optimizer = make_optimizer(case.optimizer, case.learning_rate)

    parts: dict[str, dict[str, Callable[[], object]]] = {}  # row name -> {phase: function to time}
    for i, layer in enumerate(model.layers):
        phases: dict[str, Callable[[], object]] = {"forward": partial(layer.forward, inputs[i], True)}
        if i >= first:
            backward = layer.backward if i > first else layer.backward_parameters
            phases["backward"] = partial(backward, douts[i])
        parts[f"{i} {layer.type_name} -> {layer.output_shape}"] = phases
    parts["loss (softmax cross-entropy)"] = {
        "forward": partial(model.loss.forward, inputs[-1], y),
        "backward": model.loss.backward,
    }
    parts[f"optimizer step ({case.optimizer})"] = {
        "update": partial(optimizer.step, model.parameters(), model.gradients()),
    }
    contenders: dict[tuple[str, str] | str, Callable[[], object]] = {
        (name, phase): fn for name, fns in parts.items() for phase, fn in fns.items()
    }
    contenders["whole step"] = numpy_step(case, model, x, y)
    ms = {key: 1000 * s for key, s in interleaved_medians(contenders, timing).items()}

    rows: list[dict] = []
    for name, fns in parts.items():
        times = {f"{phase}_ms": ms[name, phase] for phase in fns}
        rows.append({"part": name, **times, "total_ms": sum(times.values())})
    total = sum(row["total_ms"] for row in rows)
    for row in rows:
        row["share_percent"] = 100 * row["total_ms"] / total
    rows.append({"part": "sum of the parts", "total_ms": total})
    rows.append({"part": "whole step, measured", "total_ms": ms["whole step"]})
    return rows


# ---- the benchmark ---------------------------------------------------------


def thread_counts() -> tuple[int, ...]:
    """THREAD_COUNTS, or only BENCH_THREADS's count when it is set."""
    return (bench_threads(),) if "BENCH_THREADS" in os.environ else THREAD_COUNTS


def print_throughput(throughput: list[dict], timing: Timing) -> None:
    print(
        "Throughput of one training step (forward, loss, backward, update); "
        f"medians of {timing.rounds} interleaved blocks"
    )
    print_table(
        [
            "threads",
            "model",
            "input",
            "batch",
            "optimizer",
            "ours samples/s",
            "torch samples/s",
            "ours/torch",
            "aim",
            "mark",
        ],
        [
            [
                r["threads"],
                r["model"],
                "x".join(map(str, r["input_shape"])),
                r["batch_size"],
                r["optimizer"],
                r["ours_samples_per_s"],
                r["torch_samples_per_s"],
                r["ratio"],
                f">= {r['aim']}x",
                r["mark"],
            ]
            for r in throughput
        ],
    )


def print_breakdown(breakdown: list[dict], threads: int) -> None:
    print(
        f"Where our time goes: {BREAKDOWN_CASE.preset} at batch {BREAKDOWN_CASE.batch_size}, "
        f"{threads} thread(s), ms per step"
    )
    print_table(
        ["part", "forward ms", "backward ms", "total ms", "share %"],
        [
            [r["part"], r.get("forward_ms"), r.get("backward_ms"), r["total_ms"], r.get("share_percent")]
            for r in breakdown
        ],
    )


def run() -> dict:
    counts = thread_counts()
    mode = "quick" if quick_mode() else "full"
    throughput_timing, breakdown_timing = TIMINGS[mode]
    torch = import_torch()
    facts = {**machine_facts(counts[0]), "threads": list(counts)}
    print_facts(
        f"Training speed ({mode} run, float32, {' and '.join(map(str, counts))} thread(s) "
        "for NumPy's BLAS and for torch)",
        facts,
    )
    throughput: list[dict] = []
    breakdowns: list[dict] = []
    for threads in counts:
        with limited_threads(threads):
            rows = measure_throughput(CASES, throughput_timing, torch)
            throughput += [{"threads": threads, **row} for row in rows]
            breakdowns.append(
                {
                    "threads": threads,
                    "model": BREAKDOWN_CASE.preset,
                    "batch_size": BREAKDOWN_CASE.batch_size,
                    "rows": layer_breakdown(BREAKDOWN_CASE, breakdown_timing),
                }
            )
    print_throughput(throughput, throughput_timing)
    for breakdown in breakdowns:
        print_breakdown(breakdown["rows"], breakdown["threads"])
    result = {
        "benchmark": "train_speed",
        "mode": mode,
        "machine": facts,
        "timing": {"throughput": asdict(throughput_timing), "breakdown": asdict(breakdown_timing)},
        "throughput": throughput,
        "breakdown": breakdowns,
    }
    print(f"wrote {write_json('speed', result)}")
    return result
