"""The trainer against a hostile or careless caller: limits before allocation, finite numbers, ids.

Real trainer server in-process on 127.0.0.1, real embedded Redis. Each case
is one that a fuzzer found answered UNKNOWN, allocated hundreds of MB on
the RPC thread, trained to a NaN model, or reached a Redis key it should
not; each now gets a clear status, and leaves no job behind.
"""

import json
import math
import re
import resource
from dataclasses import asdict, replace

import grpc
import numpy as np
import pytest
import safetensors.numpy

from shared.checkpoints.checkpoint import (
    METADATA_KEY,
    CheckpointError,
    CheckpointMeta,
    decode,
    encode,
    weights_sha256,
)
from shared.nn import build_model
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from tests.helpers import wait_finished
from tests.trainer_harness import all_jobs, get_job, list_checkpoints, mlp_job, rpc_error
from trainer_svc.limits import JobLimits

DIGITS_SHAPE = [1, 8, 8]


def spec_job(spec, **hyperparameters) -> pb.StartJobRequest:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return pb.StartJobRequest(
        model_name="hostile",
        spec_json=text,
        dataset="digits",
        hyperparameters=pb.Hyperparameters(epochs=1, **hyperparameters),
    )


def dense_spec(*layers, input_shape=DIGITS_SHAPE) -> dict:
    return {
        "input_shape": input_shape,
        "layers": [{"type": "flatten"}, *layers, {"type": "dense", "units": 10}],
    }


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- limits, before any allocation

HUGE_REQUESTS = {
    "dense 10^6 x 10^6": (
        spec_job(dense_spec({"type": "dense", "units": 10**6}, input_shape=[10**6])),
        "TRAINER_MAX_PARAMETERS",
    ),
    "hidden width 2^31 - 1": (mlp_job("hostile", hidden=(2**31 - 1,)), "TRAINER_MAX_PARAMETERS"),
    "10^11 conv filters": (
        spec_job(
            {
                "input_shape": DIGITS_SHAPE,
                "layers": [
                    {"type": "conv2d", "filters": 10**11},
                    {"type": "flatten"},
                    {"type": "dense", "units": 10},
                ],
            }
        ),
        "TRAINER_MAX_PARAMETERS",
    ),
    "200,000 layers": (spec_job(dense_spec(*[{"type": "relu"}] * 200_000)), "TRAINER_MAX_SPEC_CHARACTERS"),
    "2,000 layers": (spec_job(dense_spec(*[{"type": "relu"}] * 2_000)), "TRAINER_MAX_LAYERS"),
    "20,000 hidden widths": (mlp_job("hostile", hidden=(4,) * 20_000), "TRAINER_MAX_LAYERS"),
    "JSON nested 100,000 deep": (spec_job("[" * 100_000 + "]" * 100_000), "TRAINER_MAX_SPEC_DEPTH"),
    "epochs 2^31 - 1": (mlp_job("hostile", epochs=2**31 - 1), "TRAINER_MAX_STEPS"),
    "padding 10^9 (a 10^18-pixel plane)": (
        spec_job(
            {
                "input_shape": DIGITS_SHAPE,
                "layers": [
                    {"type": "conv2d", "filters": 1, "padding": 10**9},
                    {"type": "flatten"},
                    {"type": "dense", "units": 10},
                ],
            }
        ),
        "TRAINER_MAX_PARAMETERS",
    ),
}


@pytest.mark.parametrize("request_name", HUGE_REQUESTS)
def test_a_huge_job_is_refused_before_anything_is_allocated(idle_trainer, request_name):
    request, variable = HUGE_REQUESTS[request_name]
    before = peak_rss_mib()
    error = rpc_error(idle_trainer.stub.StartJob, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert variable in error.details()
    assert peak_rss_mib() - before < 64, "the refusal allocated memory"
    assert all_jobs(idle_trainer.stub) == []


def test_estimated_training_memory_and_batch_size_have_limits_of_their_own(start_trainer):
    trainer = start_trainer(job_limits=JobLimits(memory_bytes=64 * 2**20, batch_size=512))
    wide_conv = {
        "input_shape": DIGITS_SHAPE,
        "layers": [
            {"type": "conv2d", "filters": 256, "padding": "same"},
            {"type": "relu"},
            {"type": "flatten"},
            {"type": "dense", "units": 10},
        ],
    }  # 0.2 M parameters, 64 KiB a sample
    error = rpc_error(trainer.stub.StartJob, spec_job(wide_conv, batch_size=256))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "estimated training memory" in error.details()
    assert "TRAINER_MAX_JOB_MEMORY_BYTES" in error.details()
    error = rpc_error(trainer.stub.StartJob, mlp_job("hostile", batch_size=1024))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "TRAINER_MAX_BATCH_SIZE" in error.details()
    assert all_jobs(trainer.stub) == []


# ---------------------------------------------------------------- values that cannot work

BAD_VALUES = {
    "layer type []": (spec_job(dense_spec({"type": []})), "unknown layer type"),
    "init_std null": (
        spec_job(dense_spec({"type": "dense", "units": 4, "init": "normal", "init_std": None})),
        "init_std",
    ),
    "init_std NaN": (
        spec_job(
            '{"input_shape": [64], "layers": [{"type": "dense", "units": 10, '
            '"init": "normal", "init_std": NaN}]}'
        ),
        "init_std",
    ),
    "init_std Infinity": (
        spec_job('{"input_shape": [64], "layers": [{"type": "dense", "units": 10, "init_std": Infinity}]}'),
        "init_std",
    ),
    "init []": (spec_job(dense_spec({"type": "dense", "units": 4, "init": []})), "init must be"),
    "learning_rate inf": (mlp_job("hostile", learning_rate=math.inf), "learning_rate"),
    "learning_rate NaN": (mlp_job("hostile", learning_rate=math.nan), "learning_rate"),
    "momentum NaN": (mlp_job("hostile", optimizer="momentum", momentum=math.nan), "momentum"),
    "seed -1": (mlp_job("hostile", seed=-1), "seed"),
    "warmup_epochs NaN": (mlp_job("hostile", warmup_epochs=math.nan), "warmup_epochs must be >= 0"),
    "warmup_epochs -1": (mlp_job("hostile", warmup_epochs=-1), "warmup_epochs must be >= 0"),
    "warmup_epochs = epochs": (mlp_job("hostile", epochs=2, warmup_epochs=2), "below epochs (2)"),
    "augment_shift -1": (mlp_job("hostile", augment_shift=-1), "augment_shift must be an int >= 0"),
    "augment_shift = the image's size": (
        mlp_job("hostile", augment_shift=8),
        "augment_shift must be below the images' height and width [8, 8], got 8",
    ),
    "pool padding above half the window": (
        spec_job(
            {
                "input_shape": DIGITS_SHAPE,
                "layers": [
                    {"type": "maxpool2d", "size": 2, "padding": 2},
                    {"type": "flatten"},
                    {"type": "dense", "units": 10},
                ],
            }
        ),
        "layer 0 (maxpool2d) with input shape (1, 8, 8): padding (2, 2) with a 2x2 window: "
        "padding must be at most half the window",
    ),
    "request_id with spaces": (
        pb.StartJobRequest(model_name="m", preset="mlp", dataset="digits", request_id="a b"),
        "request_id",
    ),
    "request_id of 10,000 characters": (
        pb.StartJobRequest(model_name="m", preset="mlp", dataset="digits", request_id="x" * 10_000),
        "request_id",
    ),
    "spec_json not JSON": (spec_job("{"), "spec_json is not valid JSON"),
}


@pytest.mark.parametrize("request_name", BAD_VALUES)
def test_a_value_that_cannot_work_is_invalid_argument_naming_the_field(idle_trainer, request_name):
    request, field = BAD_VALUES[request_name]
    error = rpc_error(idle_trainer.stub.StartJob, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in error.details()
    assert all_jobs(idle_trainer.stub) == []


# ---------------------------------------------------------------- divergence


def test_a_diverging_job_fails_and_publishes_nothing(trainer):
    # Finite, but 1e30-scale weights overflow float32 at once: the loss is NaN within a step or two.
    spec = dense_spec({"type": "dense", "units": 32, "init": "normal", "init_std": 1e30}, {"type": "relu"})
    job = trainer.stub.StartJob(
        spec_job(spec, optimizer="sgd", learning_rate=0.1, batch_size=32, seed=0), timeout=30
    )
    finished = wait_finished(trainer.stub, job.job_id)
    assert finished.state == pb.JOB_STATE_FAILED
    assert re.fullmatch(r"diverged at step \d+ \(loss nan\)", finished.error), finished.error
    assert trainer.store.versions("hostile") == []
    error = rpc_error(trainer.stub.ListCheckpoints, pb.ListCheckpointsRequest(model_name="hostile"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_the_checkpoint_format_refuses_non_finite_weights_both_ways():
    model = build_model(dense_spec(input_shape=[4])).initialise(0)
    meta = CheckpointMeta("m", model.spec, "float32")
    good = encode(model, meta)
    model.state_dict()["layers.1.W"][0, 0] = np.nan
    with pytest.raises(CheckpointError, match=r"non-finite weights .* layers\.1\.W"):
        encode(model, meta)
    # A NaN checkpoint written by an older build, with a checksum that matches: still refused.
    weights = model.state_dict()
    header = {"format": 1, **asdict(replace(decode(good).meta, sha256=weights_sha256(weights)))}
    blob = safetensors.numpy.save(weights, metadata={METADATA_KEY: json.dumps(header)})
    with pytest.raises(CheckpointError, match="non-finite weights"):
        decode(blob)


# ---------------------------------------------------------------- ids, paging, stored records


@pytest.mark.parametrize(
    "job_id", ["0123456789abcdef:optimizer", "*", "../x", "", "0" * 17, "ABCDEF0123456789", "x" * 100_000]
)
def test_a_malformed_job_id_is_not_found_and_reaches_no_key(idle_trainer, job_id):
    for call, request in (
        (idle_trainer.stub.GetJob, pb.GetJobRequest(job_id=job_id)),
        (idle_trainer.stub.CancelJob, pb.CancelJobRequest(job_id=job_id)),
    ):
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        assert "no such job" in error.details()
    with pytest.raises(grpc.RpcError) as caught:
        list(idle_trainer.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_id_that_names_the_optimizer_state_key_is_not_found(trainer):
    job_id = "0123456789abcdef"
    trainer.client.hset(f"tandem:job:{job_id}:optimizer", "1:1", b"x")
    error = rpc_error(trainer.stub.GetJob, pb.GetJobRequest(job_id=f"{job_id}:optimizer"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "request_fields, field",
    [
        ({"page_size": -1}, "page_size"),
        ({"page_size": -(2**31)}, "page_size"),
        ({"page_token": "-1"}, "page_token"),
        ({"page_token": "+1"}, "page_token"),
        ({"page_token": "\u0661"}, "page_token"),  # an Arabic-Indic one: int() takes it
        ({"page_token": "9" * 100}, "page_token"),
        ({"states": [99]}, "states"),
        ({"states": [pb.JOB_STATE_UNSPECIFIED]}, "states"),
    ],
)
def test_paging_and_filters_out_of_range_are_invalid_argument(idle_trainer, request_fields, field):
    error = rpc_error(idle_trainer.stub.ListJobs, pb.ListJobsRequest(**request_fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


def test_a_huge_page_size_is_served_as_the_largest_page(idle_trainer):
    page = idle_trainer.stub.ListJobs(pb.ListJobsRequest(page_size=2**31 - 1), timeout=10)
    assert page.next_page_token == ""


def test_an_unreadable_job_record_is_skipped_by_listings_and_by_a_restarted_trainer(start_trainer):
    trainer = start_trainer()
    job = trainer.stub.StartJob(mlp_job("readable", epochs=1), timeout=30)
    wait_finished(trainer.stub, job.job_id)
    for job_id, text in (
        ("00000000000000aa", b"not json"),
        ("00000000000000bb", b'{"job_id": 1}'),
        ("00000000000000cc", b"[]"),
    ):
        trainer.client.set(f"tandem:job:{job_id}", text)
        trainer.client.zadd("tandem:jobs", {job_id: 1.0})
    assert [j.job_id for j in all_jobs(trainer.stub)] == [job.job_id]
    error = rpc_error(trainer.stub.GetJob, pb.GetJobRequest(job_id="00000000000000aa"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    trainer.close()
    restarted = start_trainer()  # resumes the unfinished jobs it can read, skips the rest
    assert get_job(restarted.stub, job.job_id).state == pb.JOB_STATE_SUCCEEDED
    assert list_checkpoints(restarted.stub, "readable")


@pytest.mark.parametrize(
    "variable, value",
    [("TRAINER_MAX_LAYERS", "0"), ("TRAINER_MAX_STEPS", "-5"), ("TRAINER_MAX_PARAMETERS", "many")],
)
def test_a_limit_setting_that_cannot_work_stops_the_trainer_at_start(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        JobLimits.from_env()
