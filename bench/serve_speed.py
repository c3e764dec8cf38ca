"""Serving speed: the inference service as deployed, each figure against a peer timed in the same run.

The servers under test are processes of their own (`python -m infer_svc`,
bench.service_process) on an embedded Redis (or REDIS_URL), with the deployed
settings except where a row says otherwise; the load comes from client processes
of their own (bench.load_clients), so that neither side's GIL is the other's.
The model is the digits CNN (float32). The rows (issue 15):

- Predict at batch 1, one client: p50 / p99, against the transport's floor: an
  empty gRPC call (grpc.health.v1 Check) from the same client process.
- Predict at batch 1, 32 clients: samples/s against the same server with one
  worker process (INFER_WORKERS=1), and against INFER_BATCHING=false (the gain
  from dynamic batching).
- Predict at batch 256, 1 and 8 clients: samples/s against the model's forward
  pass and softmax (`Servable.probabilities`) in this process, one thread.
- Reload: from CheckpointStore.publish returning to the first Predict answered by
  the new version (a poller of its own in this process, calling Predict at batch
  1), while 8 clients load the server, against the same with no load.
- Against Seldon MLServer 1.7.1 (bench.mlserver_peer, when installed): the same
  checkpoint through the same forward pass, the same tritonclient load (KServe v2
  ModelInfer, raw FP32) at batch 1, 32 and 256 with 1 and 8 clients; ours at its
  defaults against each of six MLServer settings, each interleaved with ours.
- Memory: the server's RSS (its worker processes included) after 10, 100 and 1000
  reloads of a ~1.3 MB MLP, each waited until served: flat if old versions go.

Contenders of one measurement are timed in rounds, one block each per round, in
an order that reverses every round, so that the machine's noise (it is shared)
hits each alike; throughputs are medians over the rounds, latencies percentiles
over every call. Where time goes comes from the servers' own Prometheus metrics
(handler time, forward passes, their rows and time, queue wait), scraped around
each block and set beside the clients' round trips.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench import mlserver_peer
from bench.common import (
    Block,
    Contender,
    Timing,
    interleave,
    print_facts,
    print_table,
    quick_mode,
    redis_session,
    write_json,
)
from bench.load_clients import CallSpec, ClientPool, Load
from bench.report import print_rows, row
from bench.service_process import ServiceProcess
from bench.serving_model import (
    CALL_TIMEOUT,
    INPUT_SHAPE,
    MAX_QUEUE_ROWS,
    MODEL_NAME,
    NUM_CLASSES,
    batch,
    digits_cnn,
    meta_for,
    published_model,
    request_for,
)
from infer_svc.servable import Servable
from shared.checkpoints.checkpoint import save
from shared.checkpoints.store import CheckpointStore
from shared.embedded.redis_server import free_loopback_port
from shared.env import usable_cores
from shared.nn import Model, build_model
from shared.nn.presets import mlp
from shared.rpc.stubs import tandem_inference_pb2 as pb
from shared.rpc.stubs import tandem_inference_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
RSS_MODEL = "bench-rss"
RSS_HIDDEN = (1024, 256)  # 330k float32 weights, ~1.3 MB: a version held too many shows in RSS
MANY_CLIENTS = 32
READY_SECONDS = 60.0  # for a server to answer SERVING
RELOAD_TIMEOUT = 10.0  # seconds a publish has to be served
RELOAD_CHUNK = 10  # publishes per stretch of load (then as many idle)

AIM_P99_SINGLE_MS = 1.0
AIM_WORKERS_GAIN = 3.0  # 32 clients: default workers / one worker
AIM_BATCHING_GAIN = 2.0
AIM_FORWARD_RATIO = {1: 0.9, 8: 1.5}  # batch 256: clients -> Predict / in-process forward
AIM_RELOAD_P99_MS = 50.0
AIM_VS_MLSERVER = 1.5
AIM_RSS_GROWTH = 1.10  # RSS after 100 and 1000 reloads / after 10: "flat"
PEER_CASES = tuple((rows, clients) for rows in (1, 32, 256) for clients in (1, 8))


@dataclass(frozen=True)
class Settings:
    timing: Timing  # warmup_calls: untimed calls per caller
    reload_publishes: int  # under load, and as many idle
    rss_after: tuple[int, ...]  # reload counts at which RSS is read
    peer_timing: Timing  # for each MLServer setting, of each case
    # Measured against main's one-process server at load 5.6: 32 callers from 1, 2 or 4 processes
    # gave the same Predict throughput (392, 415, 442/s: the server is the bottleneck) and fewer
    # health checks the more processes (1,401, 1,042, 977/s: they take cores from the server).
    # Two leave the clients headroom against a server of several worker processes.
    client_processes: int = 2


# The full run takes about 2.5 minutes, 6 with MLServer (whose six settings start in about
# 20 s); the quick one about 30 s, 90 s with MLServer (load averages of 3 to 7 on 2 cores).
SETTINGS = {
    "full": Settings(Timing(7, 1.0, 5), 50, (10, 100, 1000), peer_timing=Timing(5, 0.6, 5)),
    "quick": Settings(Timing(2, 0.3, 2), 6, (2, 5, 10), peer_timing=Timing(1, 0.3, 2)),
}


# ---- models -------------------------------------------------------------------


def rss_mlp(seed: int) -> Model:
    return build_model(mlp(INPUT_SHAPE, NUM_CLASSES, RSS_HIDDEN)).initialise(seed)


# ---- the servers under test ------------------------------------------------------


@dataclass
class Server:
    """One of our servers under test, started; stopped at the end of its `with` block."""

    name: str
    address: str
    metrics_port: int
    process: ServiceProcess

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.process.stop()


def server_environment(
    redis_url: str, port: int, metrics_port: int, model: str, workers: int, batching: bool
):
    """The environment of `python -m infer_svc`: this one's without INFER_* and TANDEM_*
    (so the deployed defaults apply), and the settings the bench sets."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("INFER_", "TANDEM_"))}
    return {
        **inherited,
        "PYTHONPATH": str(REPO),  # this tree's infer_svc and shared
        "REDIS_URL": redis_url,
        "INFER_LISTEN": f"127.0.0.1:{port}",
        "INFER_HTTP_LISTEN": "127.0.0.1:0",  # not the default 8000: servers of several runs side by side
        "INFER_MODELS": model,
        "INFER_METRICS_PORT": str(metrics_port),  # where time goes
        "INFER_WORKERS": str(workers),
        "INFER_BATCHING": "true" if batching else "false",
        "INFER_MAX_QUEUE_ROWS": str(MAX_QUEUE_ROWS),
        "INFER_GRACE_SECONDS": "1",
    }


def wait_serving(address: str, service: ServiceProcess, seconds: float) -> None:
    """Return once the server's health for "" is SERVING (every model loaded); its Watch
    stream tells each change, so nothing polls."""
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=seconds, wait_for_ready=True
        )
        for answer in watch:
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return
    raise RuntimeError("the health stream ended before SERVING")


def wait_all_serving(
    address: str, metrics_port: int, workers: int, service: ServiceProcess, seconds: float
) -> None:
    """`wait_serving`, then until every worker process has loaded the model: a health check
    reaches one worker (the kernel picks one per connection), the metrics count them all."""
    deadline = time.monotonic() + seconds
    wait_serving(address, service, seconds)
    loads = ("tandem_infer_model_loads_total",)
    while scrape(metrics_port, loads)[loads[0]] < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service.name}: not every one of {workers} workers loaded the model")
        time.sleep(0.05)  # bounded by the deadline; the metrics have no stream to watch


def tandem_server(
    name: str,
    redis_url: str,
    log_dir: Path,
    *,
    model: str = MODEL_NAME,
    workers: int = 0,
    batching: bool = True,
) -> Server:
    """`python -m infer_svc` serving `model`, with `workers` processes (0: the deployed default,
    the usable cores), started; `ready` waits for it."""
    port, metrics_port = free_loopback_port(), free_loopback_port()
    workers = workers or usable_cores()
    env = server_environment(redis_url, port, metrics_port, model, workers, batching)
    address = f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "infer_svc"]
    wait = partial(wait_all_serving, address, metrics_port, workers)
    process = ServiceProcess(name, argv, env, log_dir, wait, cwd=REPO)
    return Server(name, address, metrics_port, process)


def ready(*processes: ServiceProcess) -> None:
    """Wait for each (started together, so their starts overlap)."""
    for process in processes:
        process.wait_ready(READY_SECONDS)


# What the servers' metrics say about where time goes: sums and counts of each series.
METRICS = (
    "tandem_infer_request_seconds_sum",
    "tandem_infer_request_seconds_count",
    "tandem_infer_queue_seconds_sum",
    "tandem_infer_compute_seconds_sum",
    "tandem_infer_compute_seconds_count",
    "tandem_infer_batch_rows_sum",
    "tandem_infer_batch_requests_sum",
)


def scrape(metrics_port: int, names: tuple[str, ...] = METRICS) -> dict[str, float]:
    """The server's metrics `names`, each summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                values[sample.name] += sample.value
    return values


# ---- contenders, timed in interleaved rounds ------------------------------------------


@dataclass
class ServerContender(Contender):
    """A contender against one of our servers: its metrics are scraped around each block and
    their changes added up, to tell where a request's time goes."""

    metrics_port: int = 0
    server_side: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))

    def time_block(self, seconds: float) -> None:
        before = scrape(self.metrics_port)
        super().time_block(seconds)
        for name, value in scrape(self.metrics_port).items():
            self.server_side[name] += value - before[name]

    def where_time_goes(self) -> dict | None:
        """Per request: the round trip, the server's handler, and the forward passes behind it."""
        s = self.server_side
        requests, passes = s["tandem_infer_request_seconds_count"], s["tandem_infer_compute_seconds_count"]
        if not requests or not passes:
            return None
        summary = self.summary()
        round_trip = summary["mean_ms"]
        handler = s["tandem_infer_request_seconds_sum"] / requests * 1e3
        return {
            # Below 1: the metrics endpoint sees only some of the calls (one worker process's).
            "share_seen": requests / summary["calls"],
            "round_trip_ms": round_trip,
            "handler_ms": handler,
            "outside_handler_ms": round_trip - handler,
            "queue_ms_per_pass": s["tandem_infer_queue_seconds_sum"] / passes * 1e3,
            "compute_ms_per_pass": s["tandem_infer_compute_seconds_sum"] / passes * 1e3,
            "rows_per_pass": s["tandem_infer_batch_rows_sum"] / passes,
            "requests_per_pass": s["tandem_infer_batch_requests_sum"] / passes,
        }


def in_process_block(servable: Servable, x: np.ndarray, seconds: float) -> Block:
    """The servable's forward and softmax in a loop, in this process, for about `seconds`."""
    latencies = []
    start = now = time.perf_counter()
    while now < start + seconds:
        servable.probabilities(x)
        latencies.append(time.perf_counter() - now)
        now = time.perf_counter()
    return Block(len(latencies) * len(x), now - start, np.array(latencies))


class Loads:
    """The bench's loads on one ClientPool, as contenders; removed (connections closed) at the end."""

    def __init__(self, pool: ClientPool, warmup_calls: int, stack: ExitStack):
        self.pool, self.warmup_calls, self.stack = pool, warmup_calls, stack

    def add(self, spec: CallSpec, callers: int) -> Load:
        load = self.pool.add(spec, callers, self.warmup_calls)
        self.stack.callback(self.pool.remove, load)
        return load

    def contender(self, name: str, spec: CallSpec, callers: int, server: Server | None = None) -> Contender:
        """The load as a contender; against `server`, one that scrapes its metrics."""
        run = partial(self.pool.run, self.add(spec, callers))
        return (
            ServerContender(name, run, metrics_port=server.metrics_port) if server else Contender(name, run)
        )


# ---- the measurements -----------------------------------------------------------------


def predict(server: Server, rows: int) -> CallSpec:
    return CallSpec("predict", server.address, MODEL_NAME, batch(rows))


def serving(redis_url: str, settings: Settings, pool: ClientPool, servable: Servable, log_dir: Path) -> dict:
    """Every Predict contender and its peer servers, interleaved; the contenders' summaries."""
    with ExitStack() as stack:
        default = stack.enter_context(tandem_server("infer-default", redis_url, log_dir))
        single = stack.enter_context(tandem_server("infer-1-worker", redis_url, log_dir, workers=1))
        plain = stack.enter_context(tandem_server("infer-no-batching", redis_url, log_dir, batching=False))
        ready(default.process, single.process, plain.process)
        loads = Loads(pool, settings.timing.warmup_calls, stack)
        x256 = batch(256)
        servable.probabilities(x256)
        contenders = [
            loads.contender("floor", CallSpec("health", default.address), 1),
            loads.contender("b1 x1", predict(default, 1), 1, default),
            loads.contender("b1 x32", predict(default, 1), MANY_CLIENTS, default),
            loads.contender("b1 x32 one worker", predict(single, 1), MANY_CLIENTS, single),
            loads.contender("b1 x32 no batching", predict(plain, 1), MANY_CLIENTS, plain),
            loads.contender("b256 x1", predict(default, 256), 1, default),
            loads.contender("b256 x8", predict(default, 256), 8, default),
            Contender("forward 256", partial(in_process_block, servable, x256)),
        ]
        interleave(contenders, settings.timing)
    return {
        c.name: {
            **c.summary(),
            "where_time_goes": c.where_time_goes() if isinstance(c, ServerContender) else None,
        }
        for c in contenders
    }


def first_answer(stub, request: pb.PredictRequest, version: int, published: float) -> float | None:
    """Seconds from `published` to the first Predict answered by `version`; None past RELOAD_TIMEOUT."""
    while True:
        answer = stub.Predict(request, timeout=CALL_TIMEOUT)
        elapsed = time.perf_counter() - published
        if answer.version == version:
            return elapsed
        if elapsed > RELOAD_TIMEOUT:
            return None


def reload_latency(server: Server, store: CheckpointStore, pool: ClientPool, settings: Settings) -> dict:
    """Publish -> first answer from the new version, in stretches with 8 clients loading the
    server and stretches without, alternately."""
    models = [digits_cnn(seed) for seed in (101, 102)]  # built before timing; alternate
    request = request_for(1)
    load = pool.add(predict(server, 1), 8, settings.timing.warmup_calls)
    seconds: dict[str, list[float]] = {"loaded": [], "idle": []}
    missed, loaded_calls = 0, 0
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = tandem_inference_pb2_grpc.InferenceStub(channel)
            stub.Predict(request, timeout=CALL_TIMEOUT)
            for start in range(0, settings.reload_publishes, RELOAD_CHUNK):
                chunk = min(RELOAD_CHUNK, settings.reload_publishes - start)
                for case in ("loaded", "idle"):
                    if case == "loaded":
                        start_at = pool.start(load, RELOAD_TIMEOUT * (chunk + 1))
                        time.sleep(max(0.0, start_at - time.monotonic()))  # the load's agreed start
                    for i in range(chunk):
                        version = store.publish(models[i % 2], meta_for(MODEL_NAME, models[i % 2]))
                        elapsed = first_answer(stub, request, version, time.perf_counter())
                        if elapsed is None:
                            missed += 1
                        else:
                            seconds[case].append(elapsed)
                    if case == "loaded":
                        pool.stop_early()
                        loaded_calls += len(pool.collect(load, start_at).latencies)
    finally:
        pool.remove(load)

    def percentiles(values: list[float]) -> dict:
        ms = np.array(values) * 1e3
        return {q: float(np.percentile(ms, n)) for q, n in (("p50_ms", 50), ("p99_ms", 99))} | {
            "max_ms": float(ms.max()),
            "publishes": len(values),
        }

    return {
        "loaded": percentiles(seconds["loaded"]),
        "idle": percentiles(seconds["idle"]),
        "missed": missed,
        "load_calls": loaded_calls,
    }


def memory_over_reloads(redis_url: str, store: CheckpointStore, settings: Settings, log_dir: Path) -> dict:
    """The server's RSS at start and after each count of settings.rss_after reloads of the MLP,
    each waited until served."""
    models = [rss_mlp(seed) for seed in (1, 2)]
    store.publish(models[0], meta_for(RSS_MODEL, models[0]))
    request = request_for(1, RSS_MODEL)
    missed = 0
    with (
        tandem_server("infer-rss", redis_url, log_dir, model=RSS_MODEL) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        ready(server.process)
        stub = tandem_inference_pb2_grpc.InferenceStub(channel)
        stub.Predict(request, timeout=CALL_TIMEOUT)
        rss = {0: server.process.rss_bytes()}
        for reloads in range(1, max(settings.rss_after) + 1):
            model = models[reloads % 2]
            version = store.publish(model, meta_for(RSS_MODEL, model))
            if first_answer(stub, request, version, time.perf_counter()) is None:
                missed += 1
            if reloads in settings.rss_after:
                rss[reloads] = server.process.rss_bytes()
    return {"rss_mb": {n: b / 2**20 for n, b in rss.items()}, "missed": missed}


def versus_mlserver(
    server: Server, store: CheckpointStore, pool: ClientPool, settings: Settings, work_dir: Path
) -> dict:
    """Ours at its defaults against every MLServer setting at once (all running, each case's
    contenders interleaved), with the same tritonclient load; each setting's answers checked
    against ours first."""
    import tritonclient.grpc as triton

    version = store.latest_version(MODEL_NAME) or 0
    checkpoint = store.get(MODEL_NAME, version)
    path = work_dir / "bench-serve.safetensors"
    save(path, checkpoint.model, replace(checkpoint.meta, version=version))
    with ExitStack() as stack:
        peers = {}
        for setting in mlserver_peer.SETTINGS:
            address, process = mlserver_peer.mlserver(setting, MODEL_NAME, path, work_dir)
            peers[setting] = (address, stack.enter_context(process))
        ready(*(process for _, process in peers.values()))
        about = {
            setting.name: {
                "default": setting.is_default,
                "max_abs_difference": answers_differ(triton, server.address, address),
                "ready_seconds": process.ready_seconds,
            }
            for setting, (address, process) in peers.items()
        }
        cases = {}
        for rows, clients in PEER_CASES:
            x = batch(rows)
            with ExitStack() as case_stack:  # the case's connections closed after it
                loads = Loads(pool, settings.timing.warmup_calls, case_stack)
                contenders = [
                    loads.contender("ours", CallSpec("kserve", server.address, MODEL_NAME, x), clients)
                ]
                contenders += [
                    loads.contender(setting.name, CallSpec("kserve", address, MODEL_NAME, x), clients)
                    for setting, (address, _) in peers.items()
                ]
                interleave(contenders, settings.peer_timing)
            ours, *theirs = (c.summary() for c in contenders)
            cases[f"{rows}x{clients}"] = {
                "ours": ours,
                "theirs": {c.name: summary for c, summary in zip(contenders[1:], theirs, strict=True)},
            }
    return {"settings": about, "cases": cases}


def answers_differ(triton, ours: str, theirs: str) -> float:
    """The largest difference between our probabilities and MLServer's on one batch (0 expected:
    one forward pass); refuses to time a peer that answers otherwise."""
    x = batch(32)
    answers = []
    for address in (ours, theirs):
        client = triton.InferenceServerClient(address)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        try:
            answers.append(client.infer(MODEL_NAME, [tensor]).as_numpy("probabilities"))
        finally:
            client.close()
    difference = float(np.abs(answers[0] - answers[1]).max())
    if answers[0].shape != answers[1].shape or difference > 1e-6:
        raise RuntimeError(f"MLServer answers differ from ours by {difference} on one batch")
    return difference


def measure(redis_url: str, settings: Settings, with_mlserver: bool | None = None) -> dict:
    """Every measurement, against servers started on `redis_url` (a Redis of the bench's own).
    `with_mlserver` None: when installed."""
    if with_mlserver is None:
        with_mlserver = mlserver_peer.installed()
    with (
        published_model(redis_url, RSS_MODEL) as store,
        tempfile.TemporaryDirectory(prefix="bench-serve-") as work,
        ClientPool(settings.client_processes) as pool,
    ):
        work_dir = Path(work)
        servable = Servable.load(store, MODEL_NAME, store.latest_version(MODEL_NAME) or 1)
        results: dict = {}
        took = results["seconds"] = {}  # each part's wall time, to keep the run's length in check
        started = time.perf_counter()

        def done(part: str) -> None:
            took[part] = round(time.perf_counter() - started - sum(took.values()), 1)

        results["contenders"] = serving(redis_url, settings, pool, servable, work_dir)
        done("contenders")
        with tandem_server("infer-default", redis_url, work_dir) as server:
            ready(server.process)
            results["reload"] = reload_latency(server, store, pool, settings)
            done("reload")
            if with_mlserver:
                results["mlserver"] = versus_mlserver(server, store, pool, settings, work_dir)
                done("mlserver")
        results["memory"] = memory_over_reloads(redis_url, store, settings, work_dir)
        done("memory")
    return results


# ---- the rows -------------------------------------------------------------------------


def times_peer(name: str, ours: dict, peer: dict, peer_name: str, aim: float, **details) -> dict:
    """A throughput row: ours at least `aim` times the peer's samples/s."""
    return row(
        name,
        ours["samples_per_s"],
        peer["samples_per_s"],
        peer_name,
        "samples/s",
        f">= {aim:g}x",
        ours["samples_per_s"] >= aim * peer["samples_per_s"],
        p50_ms=ours["p50_ms"],
        peer_p50_ms=peer["p50_ms"],
        **details,
    )


FORWARD = "Servable.probabilities in the bench, 1 thread"
# name, our contender, the peer contender, what the peer is, aim: ours >= aim x peer.
THROUGHPUT_ROWS = (
    (
        f"Predict batch 1, {MANY_CLIENTS} clients",
        "b1 x32",
        "b1 x32 one worker",
        "same server, INFER_WORKERS=1",
        AIM_WORKERS_GAIN,
    ),
    (
        f"dynamic batching gain, {MANY_CLIENTS} single-sample clients",
        "b1 x32",
        "b1 x32 no batching",
        "same server, INFER_BATCHING=false",
        AIM_BATCHING_GAIN,
    ),
    (
        "Predict batch 256, 1 client vs in-process forward",
        "b256 x1",
        "forward 256",
        FORWARD,
        AIM_FORWARD_RATIO[1],
    ),
    (
        "Predict batch 256, 8 clients vs in-process forward",
        "b256 x8",
        "forward 256",
        FORWARD,
        AIM_FORWARD_RATIO[8],
    ),
)


def rows_from(results: dict) -> list[dict]:
    """The report's rows, each against its peer from the same run."""
    c = results["contenders"]
    floor, single = c["floor"], c["b1 x1"]
    rows = [
        row(
            "empty gRPC call (health Check), 1 client: p50 / p99 (transport floor)",
            floor["p99_ms"],
            None,
            "",
            "ms",
            "-",
            None,
            p50_ms=floor["p50_ms"],
        ),
        row(
            "Predict batch 1, 1 client: p50 / p99",
            single["p99_ms"],
            floor["p99_ms"],
            "empty gRPC call, same client",
            "ms",
            f"p99 <= {AIM_P99_SINGLE_MS:g} ms",
            single["p99_ms"] <= AIM_P99_SINGLE_MS,
            p50_ms=single["p50_ms"],
            peer_p50_ms=floor["p50_ms"],
        ),
    ]
    rows += [
        times_peer(name, c[ours], c[peer], peer_name, aim)
        for name, ours, peer, peer_name, aim in THROUGHPUT_ROWS
    ]
    loaded, idle, missed = (results["reload"][key] for key in ("loaded", "idle", "missed"))
    rows.append(
        row(
            "reload, publish -> first answer, 8 clients loading: p50 / p99",
            loaded["p99_ms"],
            idle["p99_ms"],
            "same server, no load",
            "ms",
            f"p99 <= {AIM_RELOAD_P99_MS:g} ms",
            loaded["p99_ms"] <= AIM_RELOAD_P99_MS and not missed,
            p50_ms=loaded["p50_ms"],
            peer_p50_ms=idle["p50_ms"],
            missed=missed,
        )
    )
    rows += mlserver_rows(results.get("mlserver"))
    return rows + memory_rows(results["memory"])


def memory_rows(memory: dict) -> list[dict]:
    """RSS after each count of reloads: the first against the RSS before any, the others
    against the first (flat: within AIM_RSS_GROWTH)."""
    rss = memory["rss_mb"]
    first, *later = sorted(rss)[1:]
    rows = [
        row(
            f"server RSS after {first} reloads",
            rss[first],
            rss[0],
            "RSS before the first reload",
            "MB",
            "-",
            None,
        )
    ]
    for count in later:
        ok = rss[count] <= AIM_RSS_GROWTH * rss[first] and not memory["missed"]
        rows.append(
            row(
                f"server RSS after {count} reloads",
                rss[count],
                rss[first],
                f"RSS after {first} reloads",
                "MB",
                f"<= {AIM_RSS_GROWTH:g}x (flat)",
                ok,
            )
        )
    return rows


def mlserver_rows(peer: dict | None) -> list[dict]:
    """Per case: ours against MLServer's best setting (its highest samples/s, timed in the same
    rounds as ours), with ours / MLServer's default setting beside."""
    if peer is None:
        return []
    default = next(name for name, about in peer["settings"].items() if about["default"])
    rows = []
    for rows_in, clients in PEER_CASES:
        case = peer["cases"][f"{rows_in}x{clients}"]
        ours, theirs = case["ours"], case["theirs"]
        best = max(theirs, key=lambda name: theirs[name]["samples_per_s"])
        rows.append(
            times_peer(
                f"vs MLServer {mlserver_peer.VERSION}: batch {rows_in}, {clients} client(s)",
                ours,
                theirs[best],
                best,
                AIM_VS_MLSERVER,
                ratio_vs_default=ours["samples_per_s"] / theirs[default]["samples_per_s"],
            )
        )
    return rows


# ---- the report -----------------------------------------------------------------------


def print_where_time_goes(contenders: dict) -> None:
    print("Where a request's time goes (means per request; the server's metrics scraped around each block):")
    table = []
    for name, summary in contenders.items():
        w = summary["where_time_goes"]
        if w:
            table.append(
                [
                    name,
                    w["share_seen"],
                    w["round_trip_ms"],
                    w["handler_ms"],
                    w["outside_handler_ms"],
                    w["requests_per_pass"],
                    w["rows_per_pass"],
                    w["compute_ms_per_pass"],
                    w["queue_ms_per_pass"],
                ]
            )
    # The same forward pass in this process (one BLAS thread), beside the servers' compute.
    forward = contenders["forward 256"]["mean_ms"]
    table.append(["forward 256 in the bench", None, forward, None, None, 1.0, 256, forward, None])
    print_table(
        [
            "load",
            "calls seen",
            "round trip ms",
            "in handler ms",
            "outside ms",
            "requests/pass",
            "rows/pass",
            "compute ms/pass",
            "queue ms/pass",
        ],
        table,
    )
    print(
        "(calls seen: the server's count of requests / the clients'; in handler: Predict's servicer,\n"
        " from receipt to answer: checks, queue and forward; outside: gRPC, protobuf and the\n"
        " client's own time; queue: the oldest request's wait in a pass)\n"
    )


def print_mlserver(peer: dict) -> None:
    """Samples/s of ours and of each MLServer setting, case by case (timed in the same rounds)."""
    names = list(peer["settings"])
    table = []
    for rows, clients in PEER_CASES:
        case = peer["cases"][f"{rows}x{clients}"]
        ours = case["ours"]["samples_per_s"]
        cells = [f"batch {rows}, {clients} client(s)", f"{ours:,.0f}/s"]
        for name in names:
            theirs = case["theirs"][name]["samples_per_s"]
            cells.append(f"{theirs:,.0f}/s ({ours / theirs:.2f}x)")
        table.append(cells)
    print("Samples/s of ours and of MLServer by setting (ours / theirs in brackets):")
    headers = [
        name.removeprefix("MLServer ") + (" (default)" if peer["settings"][name]["default"] else "")
        for name in names
    ]
    print_table(["case", "ours", *headers], table)


def run() -> None:
    settings = SETTINGS["quick" if quick_mode() else "full"]
    started = time.perf_counter()
    with redis_session() as (url, facts):
        facts["servers"] = (
            f"python -m infer_svc subprocesses, deployed defaults, INFER_WORKERS={usable_cores()} "
            f"(usable cores) unless the row says otherwise, INFER_MAX_QUEUE_ROWS={MAX_QUEUE_ROWS}"
        )
        facts["clients"] = (
            f"{settings.client_processes} client processes (spawned), callers spread evenly, "
            f"one channel and thread each, a prebuilt request"
        )
        facts["timing"] = (
            f"{settings.timing.rounds} rounds of {settings.timing.block_seconds} s blocks per contender, "
            f"interleaved; MLServer: {settings.peer_timing.rounds} rounds of "
            f"{settings.peer_timing.block_seconds} s per case and setting, each with ours"
        )
        peer = mlserver_peer.installed()
        facts["mlserver"] = (
            f"{mlserver_peer.VERSION} in {mlserver_peer.VENV}"
            if peer
            else f"not installed: those rows are skipped ({mlserver_peer.INSTALL_HINT})"
        )
        print_facts("Serving: the inference service as deployed, against peers timed in the same run", facts)
        results = measure(url, settings, peer)
        facts["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    rows = rows_from(results)
    print_rows(rows)
    print_where_time_goes(results["contenders"])
    if peer:
        print_mlserver(results["mlserver"])
    else:
        print(
            f"MLServer is not installed, so its rows are skipped; to install it: "
            f"{mlserver_peer.INSTALL_HINT}\n"
        )
    print(
        f"(took {time.perf_counter() - started:.0f} s; load average "
        f"{facts['load_average_1min']} before, {facts['load_average_1min_after']} after)"
    )
    print(f"wrote {write_json('serve', {'facts': facts, 'rows': rows, 'details': results})}")
