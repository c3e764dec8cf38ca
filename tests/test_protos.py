"""The wire contracts: generated stubs in step with proto/, the Open Inference
Protocol's field numbers, and the shape of Tandem's own services."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor

from shared.rpc.convert import from_tensor, to_tensor
from shared.rpc.stubs import (
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    tandem_common_pb2,
    tandem_inference_pb2,
    tandem_inference_pb2_grpc,
    tandem_trainer_pb2,
    tandem_trainer_pb2_grpc,
)

ROOT = Path(__file__).resolve().parent.parent
RPC_DIR = ROOT / "shared" / "rpc" / "stubs"
HANDWRITTEN = {"__init__.py"}


# --- Generated stubs match proto/ ----------------------------------------------


def test_generated_stubs_match_the_proto_files(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, f"scripts/gen_protos.py failed:\n{result.stdout}{result.stderr}"
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    committed = {
        p.name: p.read_bytes() for p in RPC_DIR.iterdir() if p.is_file() and p.name not in HANDWRITTEN
    }
    problems = (
        [
            f"{n} differs from what proto/ generates"
            for n in sorted(fresh.keys() & committed.keys())
            if fresh[n] != committed[n]
        ]
        + [f"{n} is missing" for n in sorted(fresh.keys() - committed.keys())]
        + [f"{n} is generated from no proto file (stale)" for n in sorted(committed.keys() - fresh.keys())]
    )
    assert not problems, (
        "shared/rpc/stubs/ is out of step with proto/*.proto; run `make protos` and commit the result:\n  "
        + "\n  ".join(problems)
    )


def test_stubs_import_each_other_within_the_package():
    for path in RPC_DIR.glob("*_pb2*.py"):
        text = path.read_text()
        for module in ("tandem_common_pb2", "tandem_trainer_pb2", "tandem_inference_pb2", "grpc_service_pb2"):
            assert f"\nimport {module}" not in text, f"{path.name}: absolute import of {module}"


# --- The Open Inference Protocol (KServe v2) ------------------------------------

T = FieldDescriptor
# message -> {field: (number, type, repeated)}, as the protocol defines them.
KSERVE_V2 = {
    "ServerLiveRequest": {},
    "ServerLiveResponse": {"live": (1, T.TYPE_BOOL, False)},
    "ServerReadyRequest": {},
    "ServerReadyResponse": {"ready": (1, T.TYPE_BOOL, False)},
    "ModelReadyRequest": {"name": (1, T.TYPE_STRING, False), "version": (2, T.TYPE_STRING, False)},
    "ModelReadyResponse": {"ready": (1, T.TYPE_BOOL, False)},
    "ServerMetadataRequest": {},
    "ServerMetadataResponse": {
        "name": (1, T.TYPE_STRING, False),
        "version": (2, T.TYPE_STRING, False),
        "extensions": (3, T.TYPE_STRING, True),
    },
    "ModelMetadataRequest": {"name": (1, T.TYPE_STRING, False), "version": (2, T.TYPE_STRING, False)},
    "ModelMetadataResponse": {
        "name": (1, T.TYPE_STRING, False),
        "versions": (2, T.TYPE_STRING, True),
        "platform": (3, T.TYPE_STRING, False),
        "inputs": (4, T.TYPE_MESSAGE, True),
        "outputs": (5, T.TYPE_MESSAGE, True),
    },
    "ModelMetadataResponse.TensorMetadata": {
        "name": (1, T.TYPE_STRING, False),
        "datatype": (2, T.TYPE_STRING, False),
        "shape": (3, T.TYPE_INT64, True),
    },
    "InferParameter": {
        "bool_param": (1, T.TYPE_BOOL, False),
        "int64_param": (2, T.TYPE_INT64, False),
        "string_param": (3, T.TYPE_STRING, False),
    },
    "InferTensorContents": {
        "bool_contents": (1, T.TYPE_BOOL, True),
        "int_contents": (2, T.TYPE_INT32, True),
        "int64_contents": (3, T.TYPE_INT64, True),
        "uint_contents": (4, T.TYPE_UINT32, True),
        "uint64_contents": (5, T.TYPE_UINT64, True),
        "fp32_contents": (6, T.TYPE_FLOAT, True),
        "fp64_contents": (7, T.TYPE_DOUBLE, True),
        "bytes_contents": (8, T.TYPE_BYTES, True),
    },
    "ModelInferRequest": {
        "model_name": (1, T.TYPE_STRING, False),
        "model_version": (2, T.TYPE_STRING, False),
        "id": (3, T.TYPE_STRING, False),
        "parameters": (4, T.TYPE_MESSAGE, True),
        "inputs": (5, T.TYPE_MESSAGE, True),
        "outputs": (6, T.TYPE_MESSAGE, True),
        "raw_input_contents": (7, T.TYPE_BYTES, True),
    },
    "ModelInferRequest.InferInputTensor": {
        "name": (1, T.TYPE_STRING, False),
        "datatype": (2, T.TYPE_STRING, False),
        "shape": (3, T.TYPE_INT64, True),
        "parameters": (4, T.TYPE_MESSAGE, True),
        "contents": (5, T.TYPE_MESSAGE, False),
    },
    "ModelInferRequest.InferRequestedOutputTensor": {
        "name": (1, T.TYPE_STRING, False),
        "parameters": (2, T.TYPE_MESSAGE, True),
    },
    "ModelInferResponse": {
        "model_name": (1, T.TYPE_STRING, False),
        "model_version": (2, T.TYPE_STRING, False),
        "id": (3, T.TYPE_STRING, False),
        "parameters": (4, T.TYPE_MESSAGE, True),
        "outputs": (5, T.TYPE_MESSAGE, True),
        "raw_output_contents": (6, T.TYPE_BYTES, True),
    },
    "ModelInferResponse.InferOutputTensor": {
        "name": (1, T.TYPE_STRING, False),
        "datatype": (2, T.TYPE_STRING, False),
        "shape": (3, T.TYPE_INT64, True),
        "parameters": (4, T.TYPE_MESSAGE, True),
        "contents": (5, T.TYPE_MESSAGE, False),
    },
}
KSERVE_RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")


def _kserve_message(dotted: str):
    descriptor = grpc_service_pb2.DESCRIPTOR.message_types_by_name[dotted.split(".", maxsplit=1)[0]]
    for part in dotted.split(".")[1:]:
        descriptor = descriptor.nested_types_by_name[part]
    return descriptor


def test_key_kserve_field_numbers():
    assert grpc_service_pb2.ModelInferRequest.RAW_INPUT_CONTENTS_FIELD_NUMBER == 7
    assert grpc_service_pb2.InferTensorContents.FP32_CONTENTS_FIELD_NUMBER == 6
    assert grpc_service_pb2.ModelInferResponse.RAW_OUTPUT_CONTENTS_FIELD_NUMBER == 6
    # On the wire: raw_input_contents is field 7, length-delimited: tag byte 7 << 3 | 2.
    request = grpc_service_pb2.ModelInferRequest(raw_input_contents=[b"\x01\x02"])
    assert request.SerializeToString() == bytes([7 << 3 | 2, 2, 1, 2])


@pytest.mark.parametrize("name", sorted(KSERVE_V2))
def test_kserve_messages_have_exactly_the_protocol_fields(name):
    descriptor = _kserve_message(name)
    actual = {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}
    assert actual == KSERVE_V2[name]
    assert descriptor.full_name == "inference." + name


def test_kserve_parameter_maps_and_oneof():
    for name in (
        "ModelInferRequest",
        "ModelInferRequest.InferInputTensor",
        "ModelInferRequest.InferRequestedOutputTensor",
        "ModelInferResponse",
        "ModelInferResponse.InferOutputTensor",
    ):
        entry = _kserve_message(name).fields_by_name["parameters"].message_type
        assert entry.GetOptions().map_entry, name
        assert entry.fields_by_name["key"].type == T.TYPE_STRING
        assert entry.fields_by_name["value"].message_type.full_name == "inference.InferParameter"
    for name in ("ModelInferRequest.InferInputTensor", "ModelInferResponse.InferOutputTensor"):
        contents = _kserve_message(name).fields_by_name["contents"].message_type
        assert contents.full_name == "inference.InferTensorContents"
    oneof = grpc_service_pb2.InferParameter.DESCRIPTOR.oneofs_by_name["parameter_choice"]
    assert [f.name for f in oneof.fields] == ["bool_param", "int64_param", "string_param"]


def test_kserve_service_full_name_and_its_six_rpcs():
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == list(KSERVE_RPCS)
    for method in service.methods:
        assert method.input_type.full_name == f"inference.{method.name}Request"
        assert method.output_type.full_name == f"inference.{method.name}Response"
        assert not method.client_streaming and not method.server_streaming
    for rpc in KSERVE_RPCS:
        assert hasattr(grpc_service_pb2_grpc.GRPCInferenceServiceServicer, rpc)


def test_kserve_file_has_a_descriptor_pool_of_its_own():
    # So that tritonclient's own build of grpc_service.proto can be imported too.
    own_pool = grpc_service_pb2.POOL  # type: ignore[attr-defined]  # by gen_protos.py; not in the .pyi
    assert grpc_service_pb2.DESCRIPTOR.pool is own_pool
    assert grpc_service_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    # Tandem's own files stay in the default pool.
    assert descriptor_pool.Default().FindServiceByName("tandem.v1.Trainer")


def test_kserve_raw_request_round_trip():
    batch = np.arange(12, dtype=np.float32).reshape(3, 4)
    request = grpc_service_pb2.ModelInferRequest(model_name="digits", model_version="2", id="r1")
    request.inputs.add(name="input", datatype="FP32", shape=batch.shape)
    request.outputs.add(name="probabilities")
    request.parameters["binary_data_output"].bool_param = True
    request.raw_input_contents.append(batch.astype("<f4").tobytes())
    parsed = grpc_service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert not parsed.inputs[0].HasField("contents")
    assert parsed.parameters["binary_data_output"].WhichOneof("parameter_choice") == "bool_param"
    decoded = np.frombuffer(parsed.raw_input_contents[0], dtype="<f4").reshape(parsed.inputs[0].shape)
    np.testing.assert_array_equal(decoded, batch)


def test_tritonclient_messages_are_wire_compatible():
    """Runs where tritonclient[grpc] is installed (it is not in the locks)."""
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    batch = np.arange(6, dtype=np.float32).reshape(2, 3)
    theirs = service_pb2.ModelInferRequest(model_name="m", model_version="1", id="x")
    theirs.inputs.add(name="input", datatype="FP32", shape=[2, 3])
    theirs.parameters["sequence_id"].int64_param = 7
    theirs.raw_input_contents.append(batch.tobytes())
    ours = grpc_service_pb2.ModelInferRequest.FromString(theirs.SerializeToString())
    assert ours.parameters["sequence_id"].int64_param == 7
    assert list(ours.inputs[0].shape) == [2, 3] and ours.raw_input_contents[0] == batch.tobytes()

    response = grpc_service_pb2.ModelInferResponse(model_name="m", model_version="1", id="x")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[2, 3])
    response.raw_output_contents.append(batch.tobytes())
    back = service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    assert back.outputs[0].name == "probabilities" and back.raw_output_contents[0] == batch.tobytes()
    for name in KSERVE_V2:
        ours_desc = _kserve_message(name)
        their_desc = service_pb2.DESCRIPTOR.message_types_by_name[name.split(".")[0]]
        for part in name.split(".")[1:]:
            their_desc = their_desc.nested_types_by_name[part]
        for field in ours_desc.fields:
            other = their_desc.fields_by_name[field.name]
            assert (other.number, other.type, other.is_repeated) == (
                field.number,
                field.type,
                field.is_repeated,
            ), f"{name}.{field.name}"


# --- Tandem's own services -------------------------------------------------------


def _methods(module, service):
    described = module.DESCRIPTOR.services_by_name[service]
    return {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in described.methods
    }


def test_trainer_service_shape():
    assert tandem_trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name == "tandem.v1.Trainer"
    assert _methods(tandem_trainer_pb2, "Trainer") == {
        "StartJob": ("StartJobRequest", "Job", False, False),
        "GetJob": ("GetJobRequest", "Job", False, False),
        "ListJobs": ("ListJobsRequest", "ListJobsResponse", False, False),
        "WatchJob": ("WatchJobRequest", "JobEvent", False, True),
        "CancelJob": ("CancelJobRequest", "Job", False, False),
        "ListCheckpoints": ("ListCheckpointsRequest", "ListCheckpointsResponse", False, False),
        "ListDatasets": ("ListDatasetsRequest", "ListDatasetsResponse", False, False),
        "UploadDataset": ("UploadDatasetChunk", "DatasetInfo", True, False),
    }
    assert hasattr(tandem_trainer_pb2_grpc, "TrainerStub")
    assert hasattr(tandem_trainer_pb2_grpc, "add_TrainerServicer_to_server")


def test_inference_service_shape():
    assert tandem_inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name == "tandem.v1.Inference"
    assert _methods(tandem_inference_pb2, "Inference") == {
        "Predict": ("PredictRequest", "PredictResponse", False, False),
        "GetModelMetadata": ("GetModelMetadataRequest", "ModelMetadata", False, False),
        "ListModels": ("ListModelsRequest", "ListModelsResponse", False, False),
    }
    assert hasattr(tandem_inference_pb2_grpc, "add_InferenceServicer_to_server")


def test_hyperparameters_mirror_the_core_and_track_presence():
    from dataclasses import fields

    from shared.nn.run import Hyperparameters

    descriptor = tandem_trainer_pb2.Hyperparameters.DESCRIPTOR
    assert {f.name for f in descriptor.fields} == {f.name for f in fields(Hyperparameters)}
    assert all(f.has_presence for f in descriptor.fields), "every hyperparameter is optional"
    hp = tandem_trainer_pb2.Hyperparameters(seed=0)
    assert hp.HasField("seed") and not hp.HasField("epochs")  # "given as 0" != "not given"


def test_epoch_metrics_carry_the_training_loop_names():
    names = {f.name for f in tandem_trainer_pb2.EpochMetrics.DESCRIPTOR.fields}
    assert {
        "epoch",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "val_loss",
        "val_accuracy",
        "seconds",
    } <= names
    metrics = tandem_trainer_pb2.EpochMetrics(epoch=1, train_loss=0.5)
    assert not metrics.HasField("val_loss")


def test_start_job_architecture_is_preset_or_spec_json():
    request = tandem_trainer_pb2.StartJobRequest(model_name="m", preset="mlp", hidden=[64])
    assert request.WhichOneof("architecture") == "preset"
    request.spec_json = '{"input_shape": [4], "layers": [{"type": "dense", "units": 3}]}'
    assert request.WhichOneof("architecture") == "spec_json" and not request.preset


def test_job_event_oneof():
    event = tandem_trainer_pb2.JobEvent(job_id="j1")
    event.checkpoint.version = 3
    assert event.WhichOneof("event") == "checkpoint"
    event.finished.state = tandem_trainer_pb2.JOB_STATE_SUCCEEDED
    assert event.WhichOneof("event") == "finished"
    states = tandem_trainer_pb2.JobState.keys()
    assert states[0] == "JOB_STATE_UNSPECIFIED"
    assert {
        "JOB_STATE_QUEUED",
        "JOB_STATE_RUNNING",
        "JOB_STATE_SUCCEEDED",
        "JOB_STATE_FAILED",
        "JOB_STATE_CANCELLED",
        "JOB_STATE_INTERRUPTED",
    } <= set(states)


def test_predict_carries_tensors_as_raw_bytes():
    batch = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    request = tandem_inference_pb2.PredictRequest(model_name="digits", inputs=to_tensor(batch), top_k=3)
    assert not request.HasField("version")
    parsed = tandem_inference_pb2.PredictRequest.FromString(request.SerializeToString())
    np.testing.assert_array_equal(from_tensor(parsed.inputs, field="inputs"), batch)
    # Raw bytes: the message is the data plus a few bytes of framing, not 5 bytes a float.
    assert len(request.SerializeToString()) < batch.nbytes + 64
    assert tandem_common_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].type == T.TYPE_BYTES
