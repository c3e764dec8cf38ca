"""Dataset uploads and the dataset catalog against hostile or careless callers.

Everything goes through a real trainer server over gRPC on 127.0.0.1, with
a real Redis: integer pixels are accepted and trained on; dtypes outside the
whitelist, shapes whose size overflows, labels out of range and non-finite
x are refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the array,
and leave no key; a stored entry that cannot be read is left out of
ListDatasets and refused for jobs; and an upload costs the trainer process
about its own size in memory, not a multiple of it.
"""

import json
import logging
from typing import Any

import grpc
import numpy as np
import pytest

from shared.checkpoints.redis_client import connect
from shared.data import load_dataset, stratified_split
from shared.embedded.redis_server import free_loopback_port
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from tests.helpers import wait_finished
from tests.trainer_harness import digits_arrays, log_tail, mlp_job, rpc_error, trainer_process, upload

DATASET_KEYS = "tandem:dataset:*"


def listed_names(stub) -> list[str]:
    return [d.name for d in stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets]


def tampered(
    name: str, arrays: dict[str, np.ndarray], declare: dict[str, dict[str, Any]], *, header_only: bool = False
):
    """The chunks of an upload of `arrays` whose header declares other fields: `{"x": {"dtype": "O"}}`."""
    chunks = list(upload(name, arrays))
    for declared in chunks[0].header.arrays:
        for field, value in declare.get(declared.name, {}).items():
            if field == "shape":
                del declared.shape[:]
                declared.shape.extend(value)
            else:
                setattr(declared, field, value)
    return iter(chunks[:1] if header_only else chunks)


def whole_digits(size: int) -> dict[str, np.ndarray]:
    """x and y alone (the trainer splits them 90/10): the first `size` digits, x (N, 1, 8, 8) floats."""
    digits = load_dataset("digits")
    return {
        "x": np.concatenate([digits.x_train, digits.x_test])[:size],
        "y": np.concatenate([digits.y_train, digits.y_test])[:size],
    }


def assert_refused(trainer, error: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    """The call got `code` with every word in its message, and left no dataset behind."""
    assert error.code() == code, (error.code(), error.details())
    for word in words:
        assert word in error.details(), (word, error.details())
    assert list(trainer.client.scan_iter(DATASET_KEYS)) == []
    assert listed_names(trainer.stub) == ["digits"]


# ---------------------------------------------------------------- integer pixels


@pytest.mark.parametrize("dtype, layout", [("uint8", "x and y"), ("int64", "four arrays")])
def test_integer_pixel_uploads_are_stored_and_trained_on(trainer, dtype, layout):
    arrays = whole_digits(500) if layout == "x and y" else digits_arrays(400, 100)
    for name in list(arrays):
        if name.startswith("x"):  # 0..255 pixels, the documented integer form
            arrays[name] = np.rint(arrays[name] * 255).astype(dtype)
    if layout == "x and y":
        train, test = stratified_split(arrays["y"], 0.1, seed=0)  # README: 90/10, stratified, seed 0
        sizes = len(train), len(test)
    else:
        sizes = 400, 100

    info = trainer.stub.UploadDataset(upload("pixels", arrays), timeout=30)
    assert (
        info.name,
        list(info.input_shape),
        info.num_classes,
        (info.train_size, info.test_size),
        info.source,
    ) == ("pixels", [1, 8, 8], 10, sizes, "upload")
    assert {d.name: d for d in trainer.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets}[
        "pixels"
    ] == info

    loaded = trainer.server.catalog.load("pixels")
    assert loaded.x_train.dtype == np.float32 and loaded.x_train.min() >= 0 and loaded.x_train.max() == 1.0
    job = trainer.stub.StartJob(mlp_job("on-pixels", epochs=1, dataset="pixels"))
    done = wait_finished(trainer.stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.progress.steps_total == -(-sizes[0] // 32)  # the train split the listing announced


# ---------------------------------------------------------------- refused at the header


@pytest.mark.parametrize(
    "array, dtype",
    [
        ("x_train", "f4,,"),
        ("x_train", "T"),
        ("x_train", "O"),
        ("x_train", "V8"),
        ("x_train", "<U4"),
        ("x_train", ">f4"),
        ("x_train", "complex64"),
        ("x_train", "M8"),
        ("x_train", "bool"),
        ("x_train", "f4"),
        ("x_train", ""),
        ("y_train", "float32"),
        ("y_test", "O"),
    ],
)
def test_dtypes_outside_the_whitelist_are_refused(idle_trainer, array, dtype):
    error = rpc_error(
        idle_trainer.stub.UploadDataset,
        tampered("odd-dtype", digits_arrays(40, 10), {array: {"dtype": dtype}}),
    )
    accepted = "float32" if array.startswith("x") else "int64"
    assert_refused(
        idle_trainer,
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"header.arrays[{array}].dtype",
        repr(dtype),
        "must be one of",
        accepted,
    )


def test_a_shape_whose_size_overflows_int64_is_refused_before_anything_is_allocated(idle_trainer):
    # 40 x 2^32 x 2^32 float32: as an int64 product, 40 * 2^64 wraps to 0, the size declared.
    overflowing = tampered(
        "overflow",
        digits_arrays(40, 10),
        {"x_train": {"shape": [40, 2**32, 2**32], "size_bytes": 0}},
        header_only=True,
    )
    error = rpc_error(idle_trainer.stub.UploadDataset, overflowing)
    assert_refused(
        idle_trainer,
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "header.arrays[x_train].size_bytes 0",
        "[40, 4294967296, 4294967296]",
        f"{40 * 2**66} bytes",
    )

    # An honest 4 TiB: over the limit, refused before a byte is set aside for it.
    huge = tampered(
        "huge",
        whole_digits(40),
        {"x": {"shape": [2**20, 2**20], "size_bytes": 2**42}, "y": {"shape": [2**20], "size_bytes": 2**23}},
        header_only=True,
    )
    error = rpc_error(idle_trainer.stub.UploadDataset, huge)
    assert_refused(
        idle_trainer,
        error,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TRAINER_MAX_UPLOAD_BYTES",
        f"{2**42 + 2**23:,} bytes",
    )


# ---------------------------------------------------------------- refused for their values


@pytest.mark.parametrize("label", [2**40, 10_000, -1])
def test_labels_out_of_range_are_refused_and_leave_nothing(idle_trainer, label):
    arrays = digits_arrays(400, 100)
    arrays["y_train"] = arrays["y_train"].copy()
    arrays["y_train"][[3, 9]] = label
    error = rpc_error(idle_trainer.stub.UploadDataset, upload("big-labels", arrays))
    assert_refused(
        idle_trainer,
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        "header.arrays[y_train]",
        f"label {label} of sample 3",
        "0..9999",
        "TRAINER_MAX_CLASSES",
    )


@pytest.mark.parametrize(
    "array, sample, value", [("x_train", 7, np.nan), ("x_test", 0, np.inf), ("x", 321, -np.inf)]
)
def test_non_finite_x_is_refused_naming_the_array_and_the_sample(idle_trainer, array, sample, value):
    arrays = whole_digits(500) if array == "x" else digits_arrays(400, 100)
    arrays[array] = arrays[array].copy()
    arrays[array][sample, 0, 5, 2:4] = value
    error = rpc_error(idle_trainer.stub.UploadDataset, upload("not-finite", arrays))
    assert_refused(
        idle_trainer,
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"header.arrays[{array}]",
        f"sample {sample} holds {value}",
        "finite",
    )


# ---------------------------------------------------------------- stored entries that cannot be read


def test_stored_entries_that_cannot_be_read_are_left_out_of_listings_and_refused_for_jobs(trainer, caplog):
    good = trainer.stub.UploadDataset(upload("good", digits_arrays(400, 100)), timeout=30)
    client = trainer.client
    fields = client.hgetall("tandem:dataset:good")
    header = json.loads(fields[b"header"])
    big_labels = np.frombuffer(fields[b"y_train"], dtype="<i8").copy()
    big_labels[0] = 2**40
    unreadable = {
        "not-json": {b"header": b"not json"},
        "deep-json": {b"header": b"[" * 100_000},
        "not-a-header": {**fields, b"header": b'{"x_train": [1, 2]}'},
        "no-header": {k: v for k, v in fields.items() if k != b"header"},
        "no-arrays": {b"header": fields[b"header"]},
        "short-x": {**fields, b"x_train": fields[b"x_train"][:-4]},
        "big-labels": {**fields, b"y_train": big_labels.tobytes()},
        "object-dtype": {
            **fields,
            b"header": json.dumps({**header, "x_train": {**header["x_train"], "dtype": "O"}}),
        },
    }
    for name, entry in unreadable.items():
        client.hset(f"tandem:dataset:{name}", mapping=entry)
    client.set("tandem:dataset:a-string", b"not a hash")
    client.hset("tandem:dataset:a:b", mapping=fields)  # not a dataset name
    client.hset(b"tandem:dataset:\xff\xfe", mapping=fields)  # nor this

    with caplog.at_level(logging.WARNING, logger="trainer_svc.datasets"):
        listed = trainer.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets
    assert [d.name for d in listed] == ["digits", "good"] and listed[1] == good
    logged = caplog.text
    for name in [*unreadable, "a-string"]:
        assert f"event=dataset_unreadable dataset={name} " in logged, name
    assert logged.count("event=dataset_key_foreign") == 2

    for name in [*unreadable, "a-string"]:
        error = rpc_error(trainer.stub.StartJob, mlp_job(f"on-{name}", dataset=name))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
        assert f"uploaded dataset {name!r} cannot be read" in error.details(), error.details()
    assert (
        "label 1099511627776 of sample 0"
        in rpc_error(trainer.stub.StartJob, mlp_job("on-big-labels", dataset="big-labels")).details()
    )
    assert (
        rpc_error(trainer.stub.StartJob, mlp_job("on-a-b", dataset="a:b")).code() == grpc.StatusCode.NOT_FOUND
    )
    assert listed_names(trainer.stub) == ["digits", "good"]


# ---------------------------------------------------------------- memory

UPLOAD_SAMPLES = 66_880  # x: 66,880 x 784 float32 = 209.7 MB (200 MiB), y: int64


def memory_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith("Vm")}


def test_an_upload_costs_the_trainer_at_most_one_and_a_half_times_its_size(private_redis, tmp_path):
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "x": rng.random((UPLOAD_SAMPLES, 784), dtype=np.float32),
        "y": np.arange(UPLOAD_SAMPLES, dtype=np.int64) % 10,
    }
    size = sum(a.nbytes for a in arrays.values())
    log_path = tmp_path / "trainer.log"
    with trainer_process(private_redis.url, free_loopback_port(), log_path, tmp_path / "data") as (
        process,
        stub,
    ):
        stub.UploadDataset(upload("warm-up", whole_digits(500)), timeout=30)  # every code path loaded once
        before = memory_kib(process.pid)["VmRSS"]
        with open(f"/proc/{process.pid}/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        info = stub.UploadDataset(upload("big", arrays, piece=2**20), timeout=120)
        memory = memory_kib(process.pid)
        peak, after = memory["VmHWM"], memory["VmRSS"]
        assert process.poll() is None, log_tail(log_path)
    figures = (
        f"upload {size / 2**20:.1f} MiB; trainer RSS before {before / 1024:.1f} MiB, "
        f"peak {peak / 1024:.1f} MiB (+{(peak - before) * 1024 / size:.2f}x the upload), "
        f"after {after / 1024:.1f} MiB"
    )
    print(figures)
    assert info.train_size + info.test_size == UPLOAD_SAMPLES and list(info.input_shape) == [784]
    client = connect(private_redis.url)
    assert client.hstrlen("tandem:dataset:big", "x") == arrays["x"].nbytes
    client.close()
    assert (peak - before) * 1024 <= 1.5 * size, figures
    assert (after - before) * 1024 <= 0.5 * size, figures  # the buffers are freed once stored
