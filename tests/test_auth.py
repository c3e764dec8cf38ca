"""Callers who prove who they are: bearer tokens, roles, owners, against the real servers.

A trainer and an inference service run in-process on 127.0.0.1 with auth on
(a tokens file made here with `shared.security.auth.issue`, the command operators
use), on one embedded Redis. Every RPC of both services, enumerated from the
services' descriptors (so a new RPC is covered without an edit), is called
with no token, a bad token and a token of each role; `EXPECTED` is the
status each gets: the domain's own answer to an empty request (OK,
NOT_FOUND, INVALID_ARGUMENT) means the call passed the access check,
UNAUTHENTICATED and PERMISSION_DENIED that it was refused. The README's
roles table is this one.

No mocks; waits are bounded (gRPC deadlines, polls with a deadline).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import REGISTRY

from infer_svc.server import InferenceServer
from shared.embedded.redis_server import EmbeddedRedis
from shared.rpc.server import grpc_server
from shared.rpc.stubs import grpc_service_pb2, tandem_inference_pb2
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from shared.security import auth
from shared.security.access import (
    METHOD_ROLES,
    REFLECTION_METHOD,
    AccessInterceptor,
    AccessSettings,
    RefusalLog,
)
from shared.security.auth import ADMIN, PREDICT, TRAIN, VIEW
from shared.security.certs import CertificateAuthority
from shared.security.tls import ClientTLS, ServerTLS
from shared.security.tls import channel as tls_channel
from tests.fuzz_calls import served_methods
from tests.helpers import wait_until
from tests.inference_harness import infer_config
from tests.trainer_harness import digits_arrays, slow_job, trainer_config, upload
from trainer_svc.server import TrainerServer

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 10.0
TRAINER = pb.DESCRIPTOR.services_by_name["Trainer"]
INFERENCE = tandem_inference_pb2.DESCRIPTOR.services_by_name["Inference"]
KSERVE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
SERVED = {"trainer": (TRAINER, HEALTH, REFLECTION), "inference": (INFERENCE, KSERVE, HEALTH, REFLECTION)}

# The callers: no credentials, a token no one issued, and one identity per role (two for train).
CALLERS = ("none", "bad", PREDICT, VIEW, TRAIN, ADMIN)
IDENTITIES = {PREDICT: "pia", VIEW: "vic", TRAIN: "alice", "bob": "bob", ADMIN: "root"}
BAD_TOKEN = "tandem-bad-token-9f86d081884c7d659a2feaa0c55ad015"

OK = grpc.StatusCode.OK
NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
REFUSED = (UNAUTH, DENIED)

# method -> the status of an empty request from:  none    bad     predict view    train   admin
# fmt: off
EXPECTED = {
    "/tandem.v1.Trainer/StartJob":                   (UNAUTH, UNAUTH, DENIED, DENIED, INVALID, INVALID),
    "/tandem.v1.Trainer/GetJob":                     (UNAUTH, UNAUTH, DENIED, NOT_FOUND, NOT_FOUND, NOT_FOUND),  # noqa: E501 - the columns line up (fmt: off)
    "/tandem.v1.Trainer/ListJobs":                   (UNAUTH, UNAUTH, DENIED, OK, OK, OK),
    "/tandem.v1.Trainer/WatchJob":                   (UNAUTH, UNAUTH, DENIED, NOT_FOUND, NOT_FOUND, NOT_FOUND),  # noqa: E501 - the columns line up (fmt: off)
    "/tandem.v1.Trainer/CancelJob":                  (UNAUTH, UNAUTH, DENIED, DENIED, NOT_FOUND, NOT_FOUND),
    "/tandem.v1.Trainer/ListCheckpoints":            (UNAUTH, UNAUTH, DENIED, INVALID, INVALID, INVALID),
    "/tandem.v1.Trainer/ListDatasets":               (UNAUTH, UNAUTH, DENIED, OK, OK, OK),
    "/tandem.v1.Trainer/UploadDataset":              (UNAUTH, UNAUTH, DENIED, DENIED, INVALID, INVALID),
    "/tandem.v1.Inference/Predict":                  (UNAUTH, UNAUTH, INVALID, DENIED, DENIED, INVALID),
    "/tandem.v1.Inference/GetModelMetadata":         (UNAUTH, UNAUTH, INVALID, DENIED, DENIED, INVALID),
    "/tandem.v1.Inference/ListModels":               (UNAUTH, UNAUTH, OK, DENIED, DENIED, OK),
    "/inference.GRPCInferenceService/ServerLive":    (UNAUTH, UNAUTH, OK, DENIED, DENIED, OK),
    "/inference.GRPCInferenceService/ServerReady":   (UNAUTH, UNAUTH, OK, DENIED, DENIED, OK),
    "/inference.GRPCInferenceService/ModelReady":    (UNAUTH, UNAUTH, OK, DENIED, DENIED, OK),
    "/inference.GRPCInferenceService/ServerMetadata": (UNAUTH, UNAUTH, OK, DENIED, DENIED, OK),
    "/inference.GRPCInferenceService/ModelMetadata": (UNAUTH, UNAUTH, INVALID, DENIED, DENIED, INVALID),
    "/inference.GRPCInferenceService/ModelInfer":    (UNAUTH, UNAUTH, INVALID, DENIED, DENIED, INVALID),
    "/grpc.health.v1.Health/Check":                  (OK, OK, OK, OK, OK, OK),
    "/grpc.health.v1.Health/Watch":                  (OK, OK, OK, OK, OK, OK),
    REFLECTION_METHOD:                               (OK, OK, OK, OK, OK, OK),   # TANDEM_REFLECTION=on
}
# fmt: on


def readme_roles_table() -> dict[str, tuple[str, ...]]:
    """The README's roles table (Security > Callers), by method: what no/bad token, predict,
    view, train and admin get, as "✔" (let through) or the status that refuses."""
    section = (REPO / "README.md").read_text().split("### Callers: tokens and roles", 1)[1]
    table = {}
    for row in section.split("\n\n| variable |", 1)[0].splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) != 6 or "`" not in cells[0]:
            continue  # the header, its rule, and the reflection row (a setting, tested below)
        service, _, names = cells[0].partition(" ")
        methods = (
            [f"/tandem.v1.{service}/{name.strip(' `')}" for name in names.split(",")]
            if service in ("Trainer", "Inference") and names
            else [
                method
                for pattern in cells[0].replace("`", "").split(", ")
                for method in EXPECTED
                if method.startswith("/" + pattern.rstrip("*"))
            ]
        )
        for method in methods:
            table[method] = tuple("✔" if cell.startswith("✔") else cell for cell in cells[1:])
    return table


def test_the_readme_roles_table_says_what_the_servers_do():
    def shown(status: grpc.StatusCode) -> str:
        return status.name if status in REFUSED else "✔"

    expected = {
        method: tuple(map(shown, statuses))
        for method, statuses in EXPECTED.items()
        if method != REFLECTION_METHOD
    }
    assert all(without == bad for without, bad, *_ in expected.values())  # one README column
    assert readme_roles_table() == {method: (row[0], *row[2:]) for method, row in expected.items()}


# ---------------------------------------------------------------- harness


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def call(
    channel: grpc.Channel,
    method: MethodDescriptor,
    metadata=(),
    request: bytes = b"",
) -> tuple[grpc.StatusCode, str]:
    """Call `method` with one request (none for a client stream) and say how it ended.

    A server stream that sends a first message (or ends) was let through; it is cancelled then.
    """
    name = path(method)
    body = iter(()) if method.client_streaming else request
    requests = "stream" if method.client_streaming else "unary"
    responses = "stream" if method.server_streaming else "unary"
    shape = f"{requests}_{responses}"
    try:
        answer = getattr(channel, shape)(name)(body, metadata=metadata, timeout=DEADLINE)
        if method.server_streaming:
            next(answer, None)
            answer.cancel()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return OK, ""


def issue_tokens(tokens_file: Path) -> dict[str, str]:
    return {
        who: auth.issue(tokens_file, identity, [who if who in auth.ROLES else TRAIN])
        for who, identity in IDENTITIES.items()
    }


class Stack:
    """A trainer and an inference service with auth on, on one Redis, and a channel to each."""

    def __init__(self, redis_server: EmbeddedRedis, tokens_file: Path, data_dir: Path, **access):
        settings = AccessSettings(tokens_file=str(tokens_file), **access)
        # Workers enough for every caller's Health/Watch at once (a quarter of them may watch).
        self.trainer = TrainerServer(
            trainer_config(redis_server.url, data_dir, auth=settings, grpc_workers=64)
        ).start()
        self.inference = InferenceServer(
            infer_config(redis_server.url, models=(), auth=settings, grpc_workers=64)
        ).start()
        self.channels = {
            "trainer": grpc.insecure_channel(f"127.0.0.1:{self.trainer.port}"),
            "inference": grpc.insecure_channel(f"127.0.0.1:{self.inference.port}"),
        }

    @property
    def trainer_channel(self) -> grpc.Channel:
        return self.channels["trainer"]

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.trainer.stop(5)
        self.inference.stop(5)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("auth") / "tokens.json"


@pytest.fixture(scope="module")
def tokens(tokens_file) -> dict[str, str]:
    return issue_tokens(tokens_file)


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def stack(redis_server, tokens_file, tokens, tmp_path_factory):
    stack = Stack(redis_server, tokens_file, tmp_path_factory.mktemp("data"))
    yield stack
    stack.close()


def credentials(tokens: dict[str, str], caller: str) -> tuple:
    if caller == "none":
        return ()
    return bearer(BAD_TOKEN if caller == "bad" else tokens[caller])


def trainer_call(stack: Stack, tokens, who: str, name: str, request=None, *, stream=None):
    """A Trainer RPC as `who` with a typed request; returns (status, details, response)."""
    method = TRAINER.methods_by_name[name]
    stub = getattr(
        stack.trainer_channel,
        "stream_unary"
        if method.client_streaming
        else "unary_stream"
        if method.server_streaming
        else "unary_unary",
    )(
        path(method),
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=getattr(pb, method.output_type.name).FromString,
    )
    try:
        answer = stub(
            stream if method.client_streaming else request,
            metadata=credentials(tokens, who),
            timeout=DEADLINE,
        )
        if method.server_streaming:
            first = next(answer)
            answer.cancel()
            return OK, "", first
        return OK, "", answer
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None


# ---------------------------------------------------------------- the table


def test_every_method_of_every_service_is_in_the_roles_table():
    """A new RPC is refused until it is added to the table on purpose, and this test names it."""
    described = {path(m) for services in SERVED.values() for s in services for m in s.methods}
    assert described - {REFLECTION_METHOD} == set(METHOD_ROLES), (
        "update shared/security/access.py METHOD_ROLES"
    )
    assert described == set(EXPECTED), "update EXPECTED here and the README's roles table"


def test_the_servers_serve_no_service_the_tests_do_not_know(stack):
    """Reflection lists what each server really serves: nothing beyond SERVED (so EXPECTED covers all)."""
    for server, channel in stack.channels.items():
        served = {path(m) for m in served_methods(channel)}
        assert served == {path(m) for s in SERVED[server] for m in s.methods}, server


@pytest.mark.parametrize(
    "server,method",
    [(server, m) for server, services in SERVED.items() for s in services for m in s.methods],
    ids=lambda v: v if isinstance(v, str) else v.full_name,
)
def test_each_caller_gets_the_status_the_table_gives(stack, tokens, server, method):
    channel = stack.channels[server]
    got = {}
    for caller in CALLERS:
        code, details = call(channel, method, credentials(tokens, caller))
        got[caller] = code
        assert BAD_TOKEN not in details and not any(token in details for token in tokens.values())
        if code in REFUSED:
            assert details, f"{caller}: a refusal says why"
    assert got == dict(zip(CALLERS, EXPECTED[path(method)], strict=True))


def test_refusals_say_why(stack, tokens):
    list_jobs = TRAINER.methods_by_name["ListJobs"]
    messages = {
        "none": call(stack.trainer_channel, list_jobs)[1],
        "malformed": call(stack.trainer_channel, list_jobs, (("authorization", "Basic dXNlcg=="),))[1],
        "bad": call(stack.trainer_channel, list_jobs, bearer(BAD_TOKEN))[1],
        "role": call(stack.trainer_channel, list_jobs, bearer(tokens[PREDICT]))[1],
    }
    assert "Bearer TOKEN" in messages["none"]
    assert "must be one 'Bearer TOKEN'" in messages["malformed"]
    assert "not known" in messages["bad"] and BAD_TOKEN not in messages["bad"]
    assert "'pia'" in messages["role"] and "needs the role train or view" in messages["role"]


def test_a_method_missing_from_the_table_is_refused_even_to_an_admin(tokens_file, tokens):
    """A server with one more RPC than the table knows: with auth on, no one may call it."""
    server = grpc_server(
        2, 2**20, interceptors=[AccessInterceptor(AccessSettings(tokens_file=str(tokens_file)), "test")]
    )
    handler = grpc.method_handlers_generic_handler(
        "test.Unlisted", {"Call": grpc.unary_unary_rpc_method_handler(lambda request, context: b"served")}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary("/test.Unlisted/Call")(b"", metadata=bearer(tokens[ADMIN]), timeout=DEADLINE)
    finally:
        server.stop(0)
    assert refused.value.code() == DENIED
    assert "not in the roles table" in refused.value.details()


def test_with_auth_off_every_call_passes_as_before(tmp_path):
    """No tokens file: no credentials needed, and a train-only call (ListJobs) answers."""
    with EmbeddedRedis() as redis_server:
        server = TrainerServer(trainer_config(redis_server.url, tmp_path, auth=AccessSettings())).start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                assert call(channel, TRAINER.methods_by_name["ListJobs"]) == (OK, "")
                assert call(channel, TRAINER.methods_by_name["CancelJob"])[0] == NOT_FOUND
        finally:
            server.stop(5)


# ---------------------------------------------------------------- owners


def test_a_train_caller_reaches_its_own_jobs_only_and_an_admin_everyone_s(stack, tokens):
    status, _, job = trainer_call(stack, tokens, TRAIN, "StartJob", slow_job("alice-model", request_id="a-1"))
    assert status == OK, _
    job_id = job.job_id
    own = pb.GetJobRequest(job_id=job_id)
    try:
        for name, request in (
            ("GetJob", own),
            ("WatchJob", pb.WatchJobRequest(job_id=job_id)),
            ("CancelJob", pb.CancelJobRequest(job_id=job_id)),
        ):
            status, details, _ = trainer_call(stack, tokens, "bob", name, request)
            assert status == DENIED, (name, status, details)
            assert "another caller's job" in details
        # bob's retry with alice's idempotency key does not hand him her job
        assert (
            trainer_call(stack, tokens, "bob", "StartJob", slow_job("bob-model", request_id="a-1"))[0]
            == DENIED
        )

        def listed(who: str) -> set[str]:
            return {
                j.job_id for j in trainer_call(stack, tokens, who, "ListJobs", pb.ListJobsRequest())[2].jobs
            }

        assert job_id in listed(TRAIN) and job_id in listed(VIEW) and job_id in listed(ADMIN)
        assert job_id not in listed("bob")
        assert trainer_call(stack, tokens, TRAIN, "GetJob", own)[0] == OK
        assert trainer_call(stack, tokens, VIEW, "GetJob", own)[0] == OK
        status, _, first = trainer_call(stack, tokens, VIEW, "WatchJob", pb.WatchJobRequest(job_id=job_id))
        assert status == OK and first.snapshot.job_id == job_id
        assert trainer_call(stack, tokens, VIEW, "CancelJob", pb.CancelJobRequest(job_id=job_id))[0] == DENIED
    finally:
        status, details, cancelled = trainer_call(
            stack, tokens, ADMIN, "CancelJob", pb.CancelJobRequest(job_id=job_id)
        )
    assert status == OK, details
    assert cancelled.state in (pb.JOB_STATE_CANCELLING, pb.JOB_STATE_CANCELLED)
    # the record keeps its owner, as Redis holds it
    assert stack.trainer.manager.get(job_id, auth.UNRESTRICTED).owner == "alice"


def test_a_train_caller_cancels_its_own_job(stack, tokens):
    status, _, job = trainer_call(stack, tokens, "bob", "StartJob", slow_job("bob-own"))
    status, details, cancelled = trainer_call(
        stack, tokens, "bob", "CancelJob", pb.CancelJobRequest(job_id=job.job_id)
    )
    assert status == OK, details
    assert cancelled.state in (pb.JOB_STATE_CANCELLING, pb.JOB_STATE_CANCELLED)


def test_only_the_uploader_or_an_admin_overwrites_a_dataset(stack, tokens):
    small, other = digits_arrays(200, 50), digits_arrays(300, 50)

    def put(who: str, arrays, overwrite: bool):
        return trainer_call(
            stack, tokens, who, "UploadDataset", stream=upload("team-digits", arrays, overwrite=overwrite)
        )

    def train_size() -> int:
        datasets = trainer_call(stack, tokens, VIEW, "ListDatasets", pb.ListDatasetsRequest())[2].datasets
        return next(d.train_size for d in datasets if d.name == "team-digits")

    assert put(TRAIN, small, False)[0] == OK
    status, details, _ = put("bob", other, True)
    assert status == DENIED and "another caller's upload" in details, details
    assert put("bob", other, False)[0] == grpc.StatusCode.ALREADY_EXISTS
    assert train_size() == 200  # bob's refused upload changed nothing
    assert put(TRAIN, other, True)[0] == OK and train_size() == 300
    assert put(ADMIN, small, True)[0] == OK and train_size() == 200


# ---------------------------------------------------------------- rotation


def test_tokens_are_issued_and_revoked_without_a_restart(stack, tokens, tokens_file):
    list_jobs = TRAINER.methods_by_name["ListJobs"]
    carol = auth.issue(tokens_file, "carol", [VIEW])
    wait_until(lambda: call(stack.trainer_channel, list_jobs, bearer(carol))[0] == OK, "a new token to work")
    assert auth.revoke(tokens_file, identity="carol") == 1
    wait_until(
        lambda: call(stack.trainer_channel, list_jobs, bearer(carol))[0] == UNAUTH,
        "a revoked token to stop working",
    )
    assert call(stack.trainer_channel, list_jobs, bearer(tokens[VIEW]))[0] == OK  # the others still do


def test_an_invalid_tokens_file_keeps_the_last_good_tokens(stack, tokens, tokens_file, caplog):
    list_jobs = TRAINER.methods_by_name["ListJobs"]
    good = tokens_file.read_text()
    caplog.set_level(logging.INFO, logger="tandem.auth")
    try:
        tokens_file.write_text('{"tokens": [{"sha256": "not hex"')

        def noticed() -> bool:  # the file is looked at when a call is checked
            call(stack.trainer_channel, list_jobs, bearer(tokens[VIEW]))
            return any("event=tokens_file_invalid" in r.getMessage() for r in caplog.records)

        wait_until(noticed, "the invalid file to be noticed")
        assert call(stack.trainer_channel, list_jobs, bearer(tokens[VIEW]))[0] == OK
        assert call(stack.trainer_channel, list_jobs)[0] == UNAUTH  # never "auth off"
    finally:
        tokens_file.write_text(good)


def test_a_tokens_file_that_cannot_be_read_stops_the_server_at_start(tmp_path):
    broken = tmp_path / "tokens.json"
    broken.write_text('{"tokens": [{"sha256": "00", "identity": "x", "roles": ["train"]}]}')
    with pytest.raises(auth.TokensFileError, match=r"tokens\[0\].sha256"):
        AccessInterceptor(AccessSettings(tokens_file=str(broken)), "test")
    with pytest.raises(FileNotFoundError):
        AccessInterceptor(AccessSettings(tokens_file=str(tmp_path / "missing.json")), "test")


def test_the_command_prints_a_token_once_and_stores_only_its_hash(tmp_path):
    tokens_file = tmp_path / "tokens.json"
    command = [sys.executable, "-m", "shared.security.auth"]
    issued = subprocess.run(
        [*command, "issue", "--identity", "dana", "--roles", "train,view", "--file", str(tokens_file)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=True,
    )
    token = issued.stdout.strip()
    stored = tokens_file.read_text()
    assert len(token) >= 40 and token not in stored
    assert json.loads(stored)["tokens"] == [
        {"sha256": auth.token_digest(token), "identity": "dana", "roles": ["train", "view"]}
    ]
    assert oct(os.stat(tokens_file).st_mode & 0o777) == "0o600"
    assert auth.TokensFile(tokens_file).by_token(token) == auth.Caller("dana", frozenset({TRAIN, VIEW}))
    subprocess.run(
        [*command, "revoke", "--token", "-", "--file", str(tokens_file)],
        input=token + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=True,
    )
    assert json.loads(tokens_file.read_text())["tokens"] == []
    refused = subprocess.run(
        [*command, "issue", "--identity", "eve", "--roles", "root", "--file", str(tokens_file)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 2 and "roles must be a non-empty list of" in refused.stderr


# ---------------------------------------------------------------- metrics and logs


def test_refusals_are_counted_and_logged_rate_limited_without_the_token(
    redis_server, tokens_file, tokens, caplog
):
    """A fresh inference server (its log limiter has seen no one): five bad tokens, one log line."""
    caplog.set_level(logging.INFO)
    server = InferenceServer(
        infer_config(redis_server.url, models=(), auth=AccessSettings(tokens_file=str(tokens_file)))
    ).start()
    list_models = INFERENCE.methods_by_name["ListModels"]

    def failures(reason: str) -> float:
        return (
            REGISTRY.get_sample_value(
                "tandem_auth_failures_total", {"service": "inference", "reason": reason}
            )
            or 0.0
        )

    before = failures("unknown_token"), failures("role")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for _ in range(5):
                assert call(channel, list_models, bearer(BAD_TOKEN))[0] == UNAUTH
            assert call(channel, list_models, bearer(tokens[TRAIN]))[0] == DENIED
            assert call(channel, list_models, bearer(tokens[PREDICT]))[0] == OK
    finally:
        server.stop(5)
    assert (failures("unknown_token"), failures("role")) == (before[0] + 5, before[1] + 1)
    refusals = [r.getMessage() for r in caplog.records if "event=auth_refused" in r.getMessage()]
    assert len(refusals) == 1, refusals  # one line per peer per minute
    assert "peer=ipv4:127.0.0.1:" in refusals[0] and "reason=unknown_token" in refusals[0]
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert BAD_TOKEN not in everything and not any(token in everything for token in tokens.values())


def test_the_refusal_log_counts_what_it_held_back():
    now = [0.0]
    limiter = RefusalLog(interval=10, clock=lambda: now[0])
    assert limiter.admit("ipv4:10.0.0.1:5000") == 0
    assert limiter.admit("ipv4:10.0.0.1:5001") is None  # another port, the same host
    assert limiter.admit("ipv4:10.0.0.2:5000") == 0  # another host
    assert limiter.admit("ipv4:10.0.0.1:5002") is None
    now[0] = 10.0
    assert limiter.admit("ipv4:10.0.0.1:5003") == 2  # two held back since the last line


# ---------------------------------------------------------------- health and reflection


def reflected_services(channel: grpc.Channel, metadata=()) -> list[str] | grpc.StatusCode:
    class WithMetadata(grpc.StreamStreamClientInterceptor):
        def intercept_stream_stream(self, continuation, details, requests):
            return continuation(details._replace(metadata=metadata, timeout=DEADLINE), requests)

    try:
        return sorted(
            ProtoReflectionDescriptorDatabase(grpc.intercept_channel(channel, WithMetadata())).get_services()
        )
    except grpc.RpcError as error:
        return error.code()


@pytest.mark.parametrize("mode", ["on", "view", "off"])
def test_reflection_follows_its_setting(redis_server, tokens_file, tokens, mode):
    server = InferenceServer(
        infer_config(
            redis_server.url, models=(), auth=AccessSettings(tokens_file=str(tokens_file), reflection=mode)
        )
    ).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            got = {
                who: reflected_services(channel, credentials(tokens, who)) for who in ("none", PREDICT, VIEW)
            }
            health = call(channel, HEALTH.methods_by_name["Check"])[0]
    finally:
        server.stop(5)
    listed = sorted([INFERENCE.full_name, KSERVE.full_name, HEALTH.full_name, REFLECTION.full_name])
    expected = {
        "on": {"none": listed, PREDICT: listed, VIEW: listed},
        "view": {"none": UNAUTH, PREDICT: DENIED, VIEW: listed},
        "off": dict.fromkeys(("none", PREDICT, VIEW), grpc.StatusCode.UNIMPLEMENTED),
    }[mode]
    assert got == expected
    assert health == OK  # probes need no token, whatever the setting


def test_the_trainer_serves_no_reflection_when_it_is_off(tmp_path, tokens_file, tokens):
    with EmbeddedRedis() as redis_server:
        server = TrainerServer(
            trainer_config(
                redis_server.url,
                tmp_path,
                auth=AccessSettings(tokens_file=str(tokens_file), reflection="off"),
            )
        ).start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                assert reflected_services(channel, bearer(tokens[ADMIN])) == grpc.StatusCode.UNIMPLEMENTED
                assert call(channel, TRAINER.methods_by_name["ListJobs"], bearer(tokens[ADMIN]))[0] == OK
        finally:
            server.stop(5)


# ---------------------------------------------------------------- mutual TLS


def test_a_client_certificate_s_common_name_stands_for_an_identity(redis_server, tmp_path):
    ca = CertificateAuthority.new()
    ca_file = ca.write(tmp_path / "ca.crt")
    server_files = ca.issue("inference", hosts=("127.0.0.1", "localhost")).write(tmp_path / "server")
    listed = ca.issue("edge-gateway", client=True).write(tmp_path / "listed")
    unlisted = ca.issue("stranger", client=True).write(tmp_path / "unlisted")
    tokens_file = tmp_path / "tokens.json"
    auth.allow_certificate(tokens_file, "edge-gateway", [PREDICT])
    token = auth.issue(tokens_file, "ops", [ADMIN])
    server = InferenceServer(
        infer_config(
            redis_server.url,
            models=(),
            auth=AccessSettings(tokens_file=str(tokens_file)),
            tls=ServerTLS(server_files["cert"], server_files["key"], ca_file),
        )
    ).start()
    list_models = INFERENCE.methods_by_name["ListModels"]
    try:

        def connect(files):
            return tls_channel(f"127.0.0.1:{server.port}", ClientTLS(ca_file, files["cert"], files["key"]))

        with connect(listed) as channel:
            assert call(channel, list_models) == (OK, "")
            assert call(channel, KSERVE.methods_by_name["ServerLive"])[0] == OK
        with connect(unlisted) as channel:
            code, details = call(channel, list_models)
            assert code == UNAUTH and "'stranger' is not in the tokens file" in details
            assert call(channel, list_models, bearer(token))[0] == OK  # a token still works
    finally:
        server.stop(5)
