"""Serving speed: the inference service's Predict against the model's own forward pass.

Everything runs in this process: an embedded Redis (or REDIS_URL), two
inference servers on 127.0.0.1 (dynamic batching on, as deployed, and off)
serving the digits CNN, and the clients, as threads. Each client thread has
a channel (one HTTP/2 connection) of its own, as separate client processes
would; it sends one prebuilt PredictRequest through the generated stub, so
the clients do no numpy encoding or decoding of their own. Clients and
servers share the GIL and the machine's cores: the figures are what the
server does with that competition, a lower bound for a server on its own.

1. Throughput (samples/s) and latency (p50, p99 per request) of Predict at
   batch 1, 32 and 256 with 1, 8 and 32 concurrent clients, on the server
   with batching on, against `Servable.probabilities` (the same forward and
   softmax the server runs) called in this process on the same batch. Each
   round times one block of every contender, in alternating order
   (bench.common's interleaving); throughputs are medians over the rounds,
   latencies are percentiles over every request of every round.
2. The gain from dynamic batching: 32 concurrent single-sample clients
   against the server with batching on and the one with it off, interleaved.
3. Reload latency: from CheckpointStore.publish returning to the first
   Predict answered by the new version, by a client polling Predict at
   batch 1 (so within one Predict's time); p50 over the publishes.
4. Where one request's time goes, at batch 1 and 256: each step of the
   server path timed alone (protobuf decode, from_tensor, the predictor's
   checks, forward and softmax, the servicer's response and metrics, the
   batcher's handoff, protobuf encode), the whole servicer called without
   gRPC, an empty gRPC call (a health check), and Predict round trips.

Aims: at batch 256, at least 0.8x the in-process forward's throughput;
a single sample at concurrency 1 within 5 ms at p99; reload p50 within 50 ms.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import (
    Timing,
    interleaved_medians,
    print_facts,
    print_table,
    quick_mode,
    redis_session,
    write_json,
)
from infer_svc.batching import Batcher
from infer_svc.config import InferConfig
from infer_svc.servable import Servable
from infer_svc.server import InferenceServer
from infer_svc.servicer import InferenceServicer
from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore
from shared.dtypes import MODEL_DTYPES
from shared.nn import Model, build_model
from shared.nn.presets import get_preset
from shared.rpc.convert import from_tensor, to_tensor
from shared.rpc.stubs import tandem_inference_pb2 as pb
from shared.rpc.stubs import tandem_inference_pb2_grpc

MODEL_NAME = "bench-serve"
INPUT_SHAPE, NUM_CLASSES = (1, 8, 8), 10  # the digits CNN's
BATCHES = (1, 32, 256)
CONCURRENCY = (1, 8, 32)
GAIN_CLIENTS = 32  # single-sample clients for the batching gain
CALL_TIMEOUT = 30.0
RELOAD_TIMEOUT = 10.0  # seconds a publish has to be served

AIM_RATIO_256 = 0.8  # Predict throughput / in-process forward, at batch 256
AIM_P99_SINGLE_MS = 5.0  # batch 1, one client
AIM_RELOAD_P50_MS = 50.0


@dataclass(frozen=True)
class Settings:
    timing: Timing  # rounds and block length (warmup_calls: untimed calls per client)
    publishes: int  # for the reload latency
    breakdown: Timing  # for the steps of the server path


# The full run takes about 2 minutes, the quick one about 20 s.
SETTINGS = {
    "full": Settings(
        Timing(rounds=7, block_seconds=0.8, warmup_calls=5),
        publishes=20,
        breakdown=Timing(rounds=5, block_seconds=0.15, warmup_calls=20),
    ),
    "quick": Settings(
        Timing(rounds=3, block_seconds=0.25, warmup_calls=2),
        publishes=8,
        breakdown=Timing(rounds=3, block_seconds=0.04, warmup_calls=5),
    ),
}


def server_config(redis_url: str, batching: bool) -> InferConfig:
    """The deployed defaults, every one explicit (INFER_* variables change nothing), except the
    queue: 32 clients with 256 rows each may wait at once, beyond the default 4096 rows."""
    return InferConfig(
        redis_url=redis_url,
        listen="127.0.0.1:0",
        models=(MODEL_NAME,),
        pinned={},
        poll_seconds=2.0,
        batching=batching,
        max_batch_size=64,
        max_queue_delay_ms=0.0,
        max_queue_rows=max(CONCURRENCY) * max(BATCHES),
        max_rows=4096,
        max_message_bytes=16 * 2**20,
        grace_seconds=1.0,
        metrics_port=0,
        metrics_address="127.0.0.1",
        grpc_workers=32,
    )


def digits_cnn(seed: int) -> Model:
    return build_model(get_preset("digits-cnn").spec(INPUT_SHAPE, NUM_CLASSES)).initialise(seed)


def publish(store: CheckpointStore, model: Model) -> int:
    return store.publish(model, CheckpointMeta(MODEL_NAME, model.spec, "float32", dataset="digits"))


def batch(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, *INPUT_SHAPE)).astype(np.float32)


# ---- timing blocks ------------------------------------------------------------


@dataclass
class Block:
    """One timed block of a contender: rows answered, wall time, and each call's latency."""

    rows: int
    seconds: float
    latencies: list[float]


@dataclass
class Contender:
    """Something timed in blocks: `run(seconds)` times one block."""

    name: str
    run: Callable[[float], Block]
    blocks: list[Block] = field(default_factory=list)

    def summary(self) -> dict:
        latencies = np.concatenate([b.latencies for b in self.blocks]) * 1e3
        return {
            "samples_per_s": statistics.median(b.rows / b.seconds for b in self.blocks),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "calls": len(latencies),
        }


def in_process_block(servable: Servable, x: np.ndarray, seconds: float) -> Block:
    """Call the servable's forward and softmax in a loop for about `seconds`."""
    latencies = []
    start = now = time.perf_counter()
    deadline = start + seconds
    while now < deadline:
        servable.probabilities(x)
        latencies.append(time.perf_counter() - now)
        now = time.perf_counter()
    return Block(len(latencies) * len(x), now - start, latencies)


def clients_block(stubs: list, request: pb.PredictRequest, rows: int, seconds: float) -> Block:
    """Each stub's thread calls Predict in a loop for about `seconds`, all starting together."""
    latencies: list[list[float]] = [[] for _ in stubs]
    finished = [0.0] * len(stubs)
    clock = {}
    errors: list[BaseException] = []

    def start_all():
        clock["start"] = time.perf_counter()
        clock["deadline"] = clock["start"] + seconds

    barrier = threading.Barrier(len(stubs), action=start_all)

    def client(index: int, stub) -> None:
        mine = latencies[index]
        barrier.wait()
        now, deadline = clock["start"], clock["deadline"]
        try:
            while now < deadline:
                stub.Predict(request, timeout=CALL_TIMEOUT)
                done = time.perf_counter()
                mine.append(done - now)
                now = done
        except grpc.RpcError as error:
            errors.append(error)
        finished[index] = now

    threads = [threading.Thread(target=client, args=(i, stub)) for i, stub in enumerate(stubs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    calls = sum(map(len, latencies))
    return Block(calls * rows, max(finished) - clock["start"], [t for ts in latencies for t in ts])


def interleave(contenders: list[Contender], timing: Timing) -> None:
    """Each round, one block of every contender; the order reverses every round."""
    for round_index in range(timing.rounds):
        for contender in contenders if round_index % 2 == 0 else reversed(contenders):
            contender.blocks.append(contender.run(timing.block_seconds))


class Clients:
    """`count` channels to one server, each with its stub, connected and warmed up."""

    def __init__(self, address: str, count: int, request: pb.PredictRequest, warmup_calls: int):
        self.channels = [grpc.insecure_channel(address) for _ in range(count)]
        self.stubs = [tandem_inference_pb2_grpc.InferenceStub(c) for c in self.channels]
        for stub in self.stubs:
            for _ in range(warmup_calls):
                stub.Predict(request, timeout=CALL_TIMEOUT)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


# ---- the measurements ---------------------------------------------------------


def request_for(rows: int) -> pb.PredictRequest:
    return pb.PredictRequest(model_name=MODEL_NAME, inputs=to_tensor(batch(rows)))


def throughput(address: str, servable: Servable, timing: Timing, stack: ExitStack) -> list[dict]:
    """Predict at each batch and concurrency against the in-process forward, interleaved."""
    contenders: list[Contender] = []
    cases: list[tuple[int, int | None]] = []  # (rows, clients); no clients: the in-process forward
    for rows in BATCHES:
        x, request = batch(rows), request_for(rows)
        servable.probabilities(x)
        contenders.append(Contender(f"in-process {rows}", partial(in_process_block, servable, x)))
        cases.append((rows, None))
        for count in CONCURRENCY:
            clients = Clients(address, count, request, timing.warmup_calls)
            stack.callback(clients.close)
            contenders.append(
                Contender(f"predict {rows} x {count}", partial(clients_block, clients.stubs, request, rows))
            )
            cases.append((rows, count))
    interleave(contenders, timing)
    results: list[dict] = []
    forward: dict[int, dict] = {}  # rows -> the in-process forward's summary
    for (rows, callers), contender in zip(cases, contenders, strict=True):
        summary = contender.summary()
        if callers is None:
            forward[rows] = summary
            results.append(
                {"batch": rows, "clients": None, "what": "in-process forward", **summary, "ratio": None}
            )
        else:
            results.append(
                {
                    "batch": rows,
                    "clients": callers,
                    "what": "Predict",
                    **summary,
                    "ratio": summary["samples_per_s"] / forward[rows]["samples_per_s"],
                }
            )
    return results


def batching_gain(on_address: str, off_address: str, timing: Timing, stack: ExitStack) -> dict:
    """GAIN_CLIENTS single-sample clients against batching on and off, interleaved."""
    request = request_for(1)
    contenders = []
    for label, address in (("batching on", on_address), ("batching off", off_address)):
        clients = Clients(address, GAIN_CLIENTS, request, timing.warmup_calls)
        stack.callback(clients.close)
        contenders.append(Contender(label, partial(clients_block, clients.stubs, request, 1)))
    interleave(contenders, timing)
    on, off = (contender.summary() for contender in contenders)
    return {"on": on, "off": off, "gain": on["samples_per_s"] / off["samples_per_s"]}


def reload_latency(address: str, store: CheckpointStore, publishes: int) -> dict:
    """Seconds from publish returning to the first Predict answered by the new version."""
    models = [digits_cnn(seed) for seed in range(100, 100 + publishes)]  # built before timing
    request = request_for(1)
    latencies, calls, missed = [], [], 0
    with grpc.insecure_channel(address) as channel:
        stub = tandem_inference_pb2_grpc.InferenceStub(channel)
        stub.Predict(request, timeout=CALL_TIMEOUT)
        for model in models:
            version = publish(store, model)
            published = time.perf_counter()
            polls = 0
            while True:
                answer = stub.Predict(request, timeout=CALL_TIMEOUT)
                polls += 1
                elapsed = time.perf_counter() - published
                if answer.version == version:
                    latencies.append(elapsed)
                    calls.append(polls)
                    break
                if elapsed > RELOAD_TIMEOUT:
                    missed += 1
                    break
    ms = np.array(latencies) * 1e3
    return {
        "publishes": publishes,
        "missed": missed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "max_ms": float(ms.max()),
        "min_ms": float(ms.min()),
        "median_polls": float(np.median(calls)),
    }


class _Precomputed:
    """Stands for a servable in the batcher: answers at once, to time the handoff alone."""

    def __init__(self, probabilities: np.ndarray):
        self._probabilities = probabilities

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return self._probabilities


def server_path_breakdown(on: InferenceServer, off: InferenceServer, timing: Timing) -> list[dict]:
    """Microseconds per request of each step of the server path, timed alone, at each batch."""
    servable = off.registry.get(MODEL_NAME)
    servicer = InferenceServicer(off.predictor)  # batching off: no handoff, no wait
    handoff = Batcher(enabled=True, max_delay=0.0)
    channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}") for server in (on, off)]
    on_stub, off_stub = (tandem_inference_pb2_grpc.InferenceStub(c) for c in channels)
    health = health_pb2_grpc.HealthStub(channels[1])
    empty_call = health_pb2.HealthCheckRequest(service="")

    def medians_at(rows: int) -> dict[str, float]:
        """Each step's median seconds for a request of `rows` rows."""
        request = request_for(rows)
        wire = request.SerializeToString()
        inputs = from_tensor(request.inputs, allowed_dtypes=MODEL_DTYPES, field="inputs")
        x = inputs.astype(np.float32)
        probabilities = servable.probabilities(x)
        response = servicer.Predict(request, None)
        response_wire = response.SerializeToString()
        precomputed = _Precomputed(probabilities)
        return interleaved_medians(
            {
                "protobuf decode of the request": lambda: pb.PredictRequest.FromString(wire),
                "from_tensor": lambda: from_tensor(request.inputs, allowed_dtypes=MODEL_DTYPES),
                "Predictor.predict (checks, forward, softmax)": lambda: off.predictor.predict(
                    MODEL_NAME, inputs
                ),
                "  of which Servable.probabilities (forward, softmax)": lambda: servable.probabilities(x),
                "servicer Predict without gRPC (from_tensor, predict, response, metrics)": lambda: (
                    servicer.Predict(request, None)
                ),
                # a lambda like the other steps, so that each timing carries the same call overhead
                "protobuf encode of the response": lambda: response.SerializeToString(),  # noqa: PLW0108
                "client: protobuf decode of the response": lambda: pb.PredictResponse.FromString(
                    response_wire
                ),
                "batcher handoff alone (max delay 0, no compute)": lambda: handoff.run(precomputed, x),
                "gRPC round trip of an empty call (health Check)": lambda: health.Check(
                    empty_call, timeout=CALL_TIMEOUT
                ),
                "Predict round trip, batching off": lambda: off_stub.Predict(request, timeout=CALL_TIMEOUT),
                "Predict round trip, batching on": lambda: on_stub.Predict(request, timeout=CALL_TIMEOUT),
            },
            timing,
        )

    rows_out: list[dict] = []
    try:
        for rows in (1, 256):
            rows_out.extend(
                {"batch": rows, "part": part, "us": seconds * 1e6}
                for part, seconds in medians_at(rows).items()
            )
    finally:
        handoff.stop()
        for channel in channels:
            channel.close()
    return rows_out


@contextmanager
def published_model(redis_url: str):
    """A checkpoint store on `redis_url` holding a version of MODEL_NAME; its keys deleted after."""
    client = connect(redis_url)
    store = CheckpointStore(client)
    try:
        publish(store, digits_cnn(0))
        yield store
    finally:
        keys = store.keys_for(MODEL_NAME)
        leftovers = list(client.scan_iter(match=f"{keys.model}:*"))
        if leftovers:
            client.delete(*leftovers)
        client.srem(store.models_key, MODEL_NAME)
        client.close()


def measure(redis_url: str, settings: Settings) -> dict:
    """Every measurement, against servers started on `redis_url` (a Redis of the bench's own)."""
    with published_model(redis_url) as store, ExitStack() as stack:
        servers = {}
        for batching in (True, False):
            server = InferenceServer(server_config(redis_url, batching)).start()
            stack.callback(server.stop, 0)
            servers[batching] = server
        on, off = (f"127.0.0.1:{servers[b].port}" for b in (True, False))
        servable = servers[True].registry.get(MODEL_NAME)
        results = {
            "throughput": throughput(on, servable, settings.timing, stack),
            "batching": batching_gain(on, off, settings.timing, stack),
            "breakdown": server_path_breakdown(servers[True], servers[False], settings.breakdown),
        }
        servers[False].stop(0)  # so that it does not load each new version beside the other
        results["reload"] = reload_latency(on, store, settings.publishes)
    return results


# ---- the report ---------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "pass" if ok else "MISS"


def run() -> None:
    settings = SETTINGS["quick" if quick_mode() else "full"]
    started = time.perf_counter()
    with redis_session() as (url, facts):
        config = server_config(url, True)
        facts["server"] = (
            f"digits-cnn float32; grpc_workers {config.grpc_workers}, "
            f"max_batch_size {config.max_batch_size}, max_queue_delay_ms "
            f"{config.max_queue_delay_ms:g}, max_queue_rows {config.max_queue_rows}"
        )
        facts["clients"] = "threads in this process, one channel each, prebuilt requests"
        facts["timing"] = (
            f"{settings.timing.rounds} rounds of {settings.timing.block_seconds} s "
            f"blocks per contender, interleaved"
        )
        print_facts("Serving: Predict through gRPC vs the in-process forward (same model, same batch)", facts)
        results = measure(url, settings)
        facts["load_average_1min_after"] = round(os.getloadavg()[0], 2)

    rows = []
    for r in results["throughput"]:
        aim = None
        if r["batch"] == 256 and r["clients"] is not None:
            aim = f"{verdict(r['ratio'] >= AIM_RATIO_256)} (>= {AIM_RATIO_256}x)"
        if r["batch"] == 1 and r["clients"] == 1:
            aim = f"{verdict(r['p99_ms'] <= AIM_P99_SINGLE_MS)} (p99 <= {AIM_P99_SINGLE_MS:g} ms)"
        rows.append(
            [
                r["batch"],
                r["clients"] or "-",
                r["what"],
                r["samples_per_s"],
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['ratio']:.2f}" if r["ratio"] is not None else "-",
                aim,
            ]
        )
    print_table(["batch", "clients", "what", "samples/s", "p50 ms", "p99 ms", "x in-process", "aim"], rows)

    gain = results["batching"]
    print(f"Dynamic batching, {GAIN_CLIENTS} concurrent single-sample clients:")
    print_table(
        ["server", "samples/s", "p50 ms", "p99 ms"],
        [
            [label, gain[key]["samples_per_s"], f"{gain[key]['p50_ms']:.2f}", f"{gain[key]['p99_ms']:.2f}"]
            for label, key in (("batching on", "on"), ("batching off", "off"))
        ],
    )
    print(f"gain from batching: {gain['gain']:.2f}x the throughput\n")

    reload = results["reload"]
    print(
        f"Reload: publish returning -> first Predict answered by the new version "
        f"({reload['publishes']} publishes, {reload['missed']} not served within "
        f"{RELOAD_TIMEOUT:g} s; median {reload['median_polls']:g} Predict calls per reload):"
    )
    print(
        f"  p50 {reload['p50_ms']:.1f} ms  p90 {reload['p90_ms']:.1f} ms  "
        f"min {reload['min_ms']:.1f} ms  max {reload['max_ms']:.1f} ms  "
        f"aim p50 <= {AIM_RELOAD_P50_MS:g} ms: "
        f"{verdict(reload['p50_ms'] <= AIM_RELOAD_P50_MS and not reload['missed'])}"
    )

    print("\nWhere one request's time goes (each step timed alone, median microseconds):")
    parts = list(dict.fromkeys(r["part"] for r in results["breakdown"]))
    by = {(r["part"], r["batch"]): r["us"] for r in results["breakdown"]}
    print_table(
        ["step", "batch 1 us", "batch 256 us"], [[part, by[(part, 1)], by[(part, 256)]] for part in parts]
    )
    print(
        f"(took {time.perf_counter() - started:.0f} s; load average "
        f"{facts['load_average_1min']} before, {facts['load_average_1min_after']} after)"
    )
    print(f"wrote {write_json('serve', {'facts': facts, **results})}")
