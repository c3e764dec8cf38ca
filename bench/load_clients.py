"""Load from client processes of their own: the serving benchmark's clients.

A `ClientPool` starts `processes` worker processes (multiprocessing's 'spawn': a
forked child would inherit the parent's gRPC state, which gRPC does not support),
once, and keeps them for the whole run, so that no block pays for starting Python.
Each load the bench adds (`add`) is one call repeated by `callers` concurrent
callers, spread over the processes; each caller is a thread with a channel (one
HTTP/2 connection) of its own, as a separate client would be. The call is built once,
in the worker, from a `CallSpec`: the timed loop does no encoding of its own beyond
what the client library does per call (tritonclient builds its request each call,
for ours and for MLServer alike).

`run(load, seconds)` starts every caller of the load at one moment (a start time a
little ahead, which every process waits for on the same monotonic clock), lets them
call for `seconds`, and gathers each call's latency back through the pipes. Clients
and the servers under test share the machine's cores: too few processes and the
clients are the bottleneck (the GIL serialises a process's callers), too many and
they starve the servers; `processes` is reported with the figures.

What crosses a pipe is our own dicts of numbers and arrays (multiprocessing pickles
them); nothing received from the network is ever unpickled.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from bench.common import Block

CALL_TIMEOUT = 30.0  # seconds; a call that takes longer fails the block
START_AHEAD = 0.05  # seconds between sending a block's start time and that time


@dataclass(frozen=True)
class CallSpec:
    """One call, repeated: `kind` is "predict" (Tandem's Predict), "kserve" (ModelInfer
    through tritonclient.grpc, raw FP32 input, the "probabilities" output asked for) or
    "health" (grpc.health.v1 Check of "": an empty call, the transport's floor)."""

    kind: str
    address: str
    model: str = ""
    inputs: np.ndarray | None = None  # the batch sent, float32

    @property
    def rows(self) -> int:
        return 1 if self.inputs is None else len(self.inputs)


# ---- in the worker processes ------------------------------------------------------


def _caller(spec: CallSpec) -> tuple[Callable[[], object], Callable[[], None]]:
    """A function making one call, with a connection of its own, and one closing it."""
    if spec.kind == "kserve":
        import tritonclient.grpc as triton

        assert spec.inputs is not None
        client = triton.InferenceServerClient(spec.address)
        tensor = triton.InferInput("input", list(spec.inputs.shape), "FP32")
        tensor.set_data_from_numpy(spec.inputs)  # raw_input_contents
        wanted = [triton.InferRequestedOutput("probabilities")]
        return (
            lambda: client.infer(spec.model, [tensor], outputs=wanted, client_timeout=CALL_TIMEOUT),
            client.close,
        )

    import grpc

    channel = grpc.insecure_channel(spec.address)
    if spec.kind == "health":
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        check = health_pb2_grpc.HealthStub(channel).Check
        empty = health_pb2.HealthCheckRequest(service="")
        return lambda: check(empty, timeout=CALL_TIMEOUT), channel.close
    if spec.kind == "predict":
        from shared.rpc.convert import to_tensor
        from shared.rpc.stubs import tandem_inference_pb2, tandem_inference_pb2_grpc

        predict = tandem_inference_pb2_grpc.InferenceStub(channel).Predict
        request = tandem_inference_pb2.PredictRequest(model_name=spec.model, inputs=to_tensor(spec.inputs))
        return lambda: predict(request, timeout=CALL_TIMEOUT), channel.close
    raise ValueError(f"unknown call kind {spec.kind!r}")


class _WorkerLoad:
    """This process's share of one load: its callers, each warmed up."""

    def __init__(self, spec: CallSpec, callers: int, warmup_calls: int):
        self.calls = [_caller(spec) for _ in range(callers)]
        for call, _ in self.calls:
            for _ in range(warmup_calls):
                call()

    def run(self, start_at: float, seconds: float, stop) -> dict:
        """Every caller calls from `start_at` for `seconds` (or until `stop`); latencies, ends."""
        latencies: list[list[float]] = [[] for _ in self.calls]
        ends = [start_at] * len(self.calls)
        errors: list[str] = []
        deadline = start_at + seconds

        def loop(index: int, call: Callable[[], object]) -> None:
            mine = latencies[index]
            time.sleep(max(0.0, start_at - time.monotonic()))  # the agreed start, on the shared clock
            now = time.monotonic()
            try:
                while now < deadline and not stop.value:
                    call()
                    done = time.monotonic()
                    mine.append(done - now)
                    now = done
            except Exception as error:  # noqa: BLE001 - grpc.RpcError, tritonclient's error: sent back
                errors.append(f"{type(error).__name__}: {error}")
            ends[index] = now

        threads = [threading.Thread(target=loop, args=(i, call)) for i, (call, _) in enumerate(self.calls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {
            "latencies": np.array([t for ts in latencies for t in ts]),
            "end": max(ends),
            "errors": errors,
        }

    def close(self) -> None:
        for _, close in self.calls:
            close()


def _worker(pipe: Connection, stop) -> None:
    """A client process: obeys ("add", id, spec, callers, warmup), ("run", id, start_at,
    seconds), ("close", id) and ("exit",) from the bench, answering each on the pipe;
    a block also ends early once the shared flag `stop` is set."""
    loads: dict[int, _WorkerLoad] = {}
    while True:
        command, *args = pipe.recv()
        try:
            if command == "add":
                load_id, spec, callers, warmup = args
                loads[load_id] = _WorkerLoad(spec, callers, warmup)
                pipe.send({"ok": True})
            elif command == "run":
                load_id, start_at, seconds = args
                pipe.send({"ok": True, **loads[load_id].run(start_at, seconds, stop)})
            elif command == "close":
                loads.pop(args[0]).close()
                pipe.send({"ok": True})
            else:
                for load in loads.values():
                    load.close()
                pipe.send({"ok": True})
                return
        except Exception as error:  # noqa: BLE001 - any failure goes back to the bench, which raises
            pipe.send({"ok": False, "error": f"{type(error).__name__}: {error}"})


# ---- in the bench process ---------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """A load added to a pool: which processes hold how many of its callers."""

    id: int
    spec: CallSpec
    callers: int
    shares: tuple[int, ...]  # callers per process

    @property
    def processes(self) -> tuple[int, ...]:
        return tuple(i for i, share in enumerate(self.shares) if share)


class ClientPool:
    """`processes` client processes, started once, driving the loads added to them."""

    def __init__(self, processes: int):
        context = multiprocessing.get_context("spawn")
        # Set: a running block ends early (the reload measurement's). Shared memory without a
        # lock, so that callers read it between calls without contending for one.
        self._stop = context.RawValue("b", 0)
        self._pipes: list[Connection] = []
        self._processes = []
        for index in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_worker, args=(theirs, self._stop), name=f"bench-client-{index}", daemon=True
            )
            process.start()
            theirs.close()
            self._pipes.append(ours)
            self._processes.append(process)
        self._next_id = 0

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def size(self) -> int:
        return len(self._processes)

    def _ask(self, index: int, *message) -> dict:
        self._pipes[index].send(message)
        return self._answer(index)

    def _answer(self, index: int) -> dict:
        answer = self._pipes[index].recv()
        if not answer["ok"]:
            raise RuntimeError(f"client process {index}: {answer['error']}")
        return answer

    def add(self, spec: CallSpec, callers: int, warmup_calls: int = 3) -> Load:
        """Open `callers` connections for `spec`, spread evenly over the processes, warmed up."""
        base, extra = divmod(callers, self.size)
        shares = tuple(base + (i < extra) for i in range(self.size))
        load = Load(self._next_id, spec, callers, shares)
        self._next_id += 1
        for index in load.processes:
            self._pipes[index].send(("add", load.id, spec, shares[index], warmup_calls))
        for index in load.processes:
            self._answer(index)
        return load

    def start(self, load: Load, seconds: float) -> float:
        """Start a block of `load` (every caller at once, shortly); returns its start time."""
        self._stop.value = 0
        start_at = time.monotonic() + START_AHEAD
        for index in load.processes:
            self._pipes[index].send(("run", load.id, start_at, seconds))
        return start_at

    def stop_early(self) -> None:
        """Make the running block end after each caller's call in flight."""
        self._stop.value = 1

    def collect(self, load: Load, start_at: float) -> Block:
        """The block started at `start_at`, once every caller has finished."""
        answers = [self._answer(index) for index in load.processes]
        errors = [error for answer in answers for error in answer["errors"]]
        if errors:
            raise RuntimeError(f"{len(errors)} caller(s) of {load.spec.kind} failed: {errors[0]}")
        latencies = np.concatenate([answer["latencies"] for answer in answers])
        seconds = max(answer["end"] for answer in answers) - start_at
        return Block(len(latencies) * load.spec.rows, seconds, latencies)

    def run(self, load: Load, seconds: float) -> Block:
        return self.collect(load, self.start(load, seconds))

    def remove(self, load: Load) -> None:
        """Close the load's connections (before its server stops)."""
        for index in load.processes:
            self._ask(index, "close", load.id)

    def close(self) -> None:
        for index, process in enumerate(self._processes):
            if process.is_alive():
                with contextlib.suppress(OSError, EOFError, RuntimeError):  # gone: terminated below
                    self._ask(index, "exit")
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for pipe in self._pipes:
            pipe.close()
