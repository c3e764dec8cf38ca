"""What the serving benchmarks serve and send: the digits CNN, its batches, a store holding it,
and, for a server in the bench's own process (security_speed), its settings and thread clients.

serve_speed runs its servers and clients as processes of their own; security_speed times
what a transport adds to one call, for which a server in this process will do.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import grpc
import numpy as np

from bench.common import Block
from infer_svc.config import InferConfig
from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore
from shared.nn import Model, build_model
from shared.nn.presets import get_preset
from shared.rpc.convert import to_tensor
from shared.rpc.stubs import tandem_inference_pb2 as pb

MODEL_NAME = "bench-serve"
INPUT_SHAPE, NUM_CLASSES = (1, 8, 8), 10  # the digits'
CALL_TIMEOUT = 30.0
# 32 clients with 256 rows each may wait at once, beyond the default 4096 rows.
MAX_QUEUE_ROWS = 32 * 256


def digits_cnn(seed: int) -> Model:
    return build_model(get_preset("digits-cnn").spec(INPUT_SHAPE, NUM_CLASSES)).initialise(seed)


def meta_for(name: str, model: Model) -> CheckpointMeta:
    return CheckpointMeta(name, model.spec, "float32", dataset="digits")


def batch(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, *INPUT_SHAPE)).astype(np.float32)


def request_for(rows: int, model: str = MODEL_NAME) -> pb.PredictRequest:
    return pb.PredictRequest(model_name=model, inputs=to_tensor(batch(rows)))


@contextmanager
def published_model(redis_url: str, *others: str):
    """A checkpoint store on `redis_url` holding a version of MODEL_NAME; the keys of it and of
    the models `others` deleted after."""
    client = connect(redis_url)
    store = CheckpointStore(client)
    try:
        model = digits_cnn(0)
        store.publish(model, meta_for(MODEL_NAME, model))
        yield store
    finally:
        for name in (MODEL_NAME, *others):
            leftovers = list(client.scan_iter(match=f"{store.keys_for(name).model}:*"))
            if leftovers:
                client.delete(*leftovers)
            client.srem(store.models_key, name)
        client.close()


def server_config(redis_url: str, batching: bool) -> InferConfig:
    """For a server in this process: the deployed defaults, every one explicit (INFER_* variables
    change nothing), except the queue (MAX_QUEUE_ROWS)."""
    return InferConfig(
        redis_url=redis_url,
        listen="127.0.0.1:0",
        models=(MODEL_NAME,),
        pinned={},
        poll_seconds=2.0,
        batching=batching,
        max_batch_size=64,
        max_queue_delay_ms=0.0,
        max_queue_rows=MAX_QUEUE_ROWS,
        max_rows=4096,
        max_message_bytes=16 * 2**20,
        grace_seconds=1.0,
        metrics_port=0,
        metrics_address="127.0.0.1",
        grpc_workers=32,
        http_listen="127.0.0.1:0",  # served, as deployed, on a free port rather than 8000
    )


def clients_block(stubs: list, request: pb.PredictRequest, rows: int, seconds: float) -> Block:
    """Each stub's thread (in this process) calls Predict in a loop for about `seconds`, all
    starting together."""
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
    return Block(calls * rows, max(finished) - clock["start"], np.array([t for ts in latencies for t in ts]))
