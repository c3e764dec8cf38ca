"""The HA stack end to end (docker-compose.yml with docker-compose.ha.yml): three trainer
replicas on one job queue, and a Redis primary, replica and three Sentinels.

Faults are real: `docker kill` (SIGKILL through the engine, which then applies no restart
policy, so the container stays down until the test starts it again) of the trainer that
holds a running job's lease, and of the Redis primary while a job trains and a client loop
predicts. What the tests look at: the trainers' gRPC API on their published ports (GetJob
answers on every replica: the records are in Redis), the inference replicas' Predict, the
trainers' logs (`event=checkpoint_published`, `event=job_succeeded`, with Docker's
timestamps), and Redis itself through `redis-cli` inside its containers: the Sentinels'
view (plaintext, on the stack's network), a job's lease key (as the `trainer` user) and a
data node's replication state (as the `sentinel` user, which may run INFO). Every wait has
a deadline; the measured figures (take-over time, failover gaps) are printed (`-s`) and
kept in the test report (`record_property`).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import re
import time
from collections.abc import Callable

import grpc
import pytest

from shared.client import TrainerClient
from shared.rpc.convert import job_state_name
from shared.rpc.stubs import tandem_inference_pb2 as pb
from shared.rpc.stubs import tandem_trainer_pb2
from tests.compose.clients import (
    TRAIN_TIMEOUT,
    Inference,
    PredictLoop,
    connect_trainer,
    deadline_loop,
    digits,
    redis_cli,
    wait_until_serving,
)
from tests.compose.stack import REDIS_MASTER_NAME, SENTINEL_PORT, SENTINELS, Stack

pytestmark = pytest.mark.compose

DATA_NODES = ("redis", "redis-replica")  # service names = the host names the Sentinels report
LONG_EPOCHS = 10  # outlives a take-over or a failover: the fault comes after 100 of ~450 steps
HA_TRAIN_TIMEOUT = 2 * TRAIN_TIMEOUT  # one job, start to end, on a 2-core machine shared with others
SPREAD_JOBS = 4
TAKEOVER_TIMEOUT = 90.0  # a killed owner's job running again elsewhere (lease 10 s + scan 3 s: at most 13 s)
FAILOVER_TIMEOUT = 60.0  # the Sentinels naming another primary (down-after 1.5 s here)
REJOIN_TIMEOUT = 120.0  # a restarted old primary in sync as a replica (Sentinel converts it ~10 s on)
SUCCEEDED = re.compile(r"event=job_succeeded job=(\S+)")
PUBLISHED = re.compile(r"event=checkpoint_published job=(\S+) model=\S+ version=(\d+) step=(\d+)")


# ---------------------------------------------------------------- Redis, through its containers


def sentinel_says(stack: Stack, sentinel: str) -> str | None:
    """The primary's host name as `sentinel` reports it; None when it does not answer."""
    container = stack.container(sentinel)
    container.reload()
    if container.status != "running":
        return None
    code, output = container.exec_run(
        ["redis-cli", "-p", str(SENTINEL_PORT), "SENTINEL", "get-master-addr-by-name", REDIS_MASTER_NAME]
    )
    lines = output.decode(errors="replace").split()
    return lines[0] if code == 0 and len(lines) == 2 else None


def agreed_primary(stack: Stack) -> str | None:
    """The data node every Sentinel names as the primary, if they agree."""
    answers = {sentinel_says(stack, sentinel) for sentinel in SENTINELS}
    return answers.pop() if len(answers) == 1 and None not in answers else None


def replication(stack: Stack, node: str) -> dict[str, str]:
    """INFO replication of a data node (empty when it is down)."""
    container = stack.container(node)
    container.reload()
    if container.status != "running":
        return {}
    text = redis_cli(stack, node, "sentinel", "INFO", "replication")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def replica_in_sync(stack: Stack, primary: str) -> str | None:
    """The other data node when it replicates `primary` with its link up, else None."""
    (other,) = (node for node in DATA_NODES if node != primary)
    info = replication(stack, other)
    primary_info = replication(stack, primary)
    in_sync = (
        info.get("role") == "slave"
        and info.get("master_host") == primary
        and info.get("master_link_status") == "up"
        and primary_info.get("role") == "master"
        and primary_info.get("connected_slaves") == "1"
    )
    return other if in_sync else None


def wait_for_ha(stack: Stack, timeout: float = REJOIN_TIMEOUT) -> tuple[str, str]:
    """Until the Sentinels agree on a primary and the other node replicates it; (primary, replica)."""
    for _ in deadline_loop("the Sentinels to agree on a primary with a replica in sync", timeout, 0.5):
        primary = agreed_primary(stack)
        if primary in DATA_NODES and (replica := replica_in_sync(stack, primary)):
            return primary, replica
    raise AssertionError("unreachable")


def lease_owner(stack: Stack, job_id: str) -> str | None:
    """The owner id (`HOST:PID:RANDOM`) in the job's lease key, on the current primary."""
    primary = agreed_primary(stack)
    if primary is None:
        return None
    owner = redis_cli(stack, primary, "trainer", "GET", f"tandem:job:{job_id}:lease")
    return owner if owner.count(":") == 2 else None


def wait_lease_taken(stack: Stack, job_id: str, owner: str) -> str:
    """Until an owner other than `owner` holds the job's lease; that owner."""
    what = f"another trainer than {owner} to hold the lease of {job_id}"
    for _ in deadline_loop(what, TAKEOVER_TIMEOUT, 0.1):
        new_owner = lease_owner(stack, job_id)
        if new_owner is not None and new_owner != owner:
            return new_owner
    raise AssertionError("unreachable")


def trainer_of(stack: Stack, owner: str):
    """The trainer container whose host name the owner id starts with."""
    host = owner.split(":", 1)[0]
    for container in stack.containers("trainer"):
        if container.attrs["Config"]["Hostname"] == host:
            return container
    raise AssertionError(f"no trainer container has host name {host!r} (owner {owner!r})")


# ---------------------------------------------------------------- trainers and their logs


class Trainers:
    """GetJob and StartJob through any running trainer replica, switching on a failed call."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self._client: TrainerClient | None = None

    def client(self) -> TrainerClient:
        if self._client is None:
            (first, *_) = self.stack.containers("trainer", all=False)
            number = int(first.labels["com.docker.compose.container-number"])
            self._client = connect_trainer(self.stack, number)
        return self._client

    def get_job(self, job_id: str) -> tandem_trainer_pb2.Job | None:
        """The job's record, or None when the call failed (a trainer down, Redis failing over)."""
        try:
            return self.client().get_job(job_id)
        except grpc.RpcError:
            self.close()
            return None

    def wait_job(
        self, job_id: str, predicate: Callable[[tandem_trainer_pb2.Job], bool], what: str, timeout: float
    ) -> tandem_trainer_pb2.Job:
        for _ in deadline_loop(f"job {job_id}: {what}", timeout, 0.2):
            job = self.get_job(job_id)
            if job is not None and predicate(job):
                return job
        raise AssertionError("unreachable")

    def finished(self, job_id: str, timeout: float = HA_TRAIN_TIMEOUT) -> tandem_trainer_pb2.Job:
        return self.wait_job(job_id, lambda j: j.HasField("finished_at"), "the end of the job", timeout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


@pytest.fixture
def trainers(healthy_ha_stack):
    pool = Trainers(healthy_ha_stack)
    yield pool
    pool.close()


@pytest.fixture
def healthy_ha_stack(ha_stack) -> Stack:
    """Every container running and healthy, the Redis set whole (a test may have killed one)."""
    for service in ha_stack.services:
        for container in ha_stack.containers(service):
            container.reload()
            if container.status in ("exited", "created"):
                container.start()
    ha_stack.wait_healthy()
    wait_for_ha(ha_stack)
    return ha_stack


def log_time(stamp: str) -> float:
    """A Docker log timestamp (RFC 3339, nanoseconds, UTC) as seconds since the epoch."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    moment = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC)
    return moment.timestamp() + float(f"0.{fraction or 0}")


def trainer_log(stack: Stack) -> list[tuple[float, str, str]]:
    """Every trainer's log lines (the killed ones' too): (time, container, text), oldest first."""
    lines = []
    for container in stack.containers("trainer"):
        for line in container.logs(timestamps=True).decode(errors="replace").splitlines():
            stamp, _, text = line.partition(" ")
            lines.append((log_time(stamp), container.name, text))
    return sorted(lines)


def published(stack: Stack, job_id: str) -> list[tuple[float, str, int]]:
    """The versions the trainers reported published for the job: (time, container, version)."""
    return [
        (at, name, int(match.group(2)))
        for at, name, text in trainer_log(stack)
        if (match := PUBLISHED.search(text)) and match.group(1) == job_id
    ]


def succeeded_on(stack: Stack, job_ids: list[str]) -> dict[str, str]:
    """job id -> the trainer container that logged it SUCCEEDED."""
    found = {}
    for _, name, text in trainer_log(stack):
        if (match := SUCCEEDED.search(text)) and match.group(1) in job_ids:
            found[match.group(1)] = name
    return found


def stored_versions(trainers: Trainers, model: str) -> list[int]:
    """The model's versions in the store, oldest first (retention keeps them all here)."""
    return sorted(checkpoint.version for checkpoint in trainers.client().list_checkpoints(model))


def load_in_container(container, model: str, versions: list[int]) -> list[int]:
    """Load and verify (checksum, architecture) each version from inside a trainer container,
    with its own Redis settings (through the Sentinels); the versions that loaded."""
    script = (
        "import sys\n"
        "from shared.checkpoints.redis_client import connect\n"
        "from shared.checkpoints.store import CheckpointStore\n"
        "store = CheckpointStore(connect())\n"
        "for version in sys.argv[2:]:\n"
        "    print('loaded', store.get(sys.argv[1], int(version)).meta.version)\n"
    )
    code, output = container.exec_run(["python", "-c", script, model, *map(str, versions)])
    text = output.decode(errors="replace")
    assert code == 0, text
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith("loaded ")]


def retried_once(call: Callable[[], pb.PredictResponse], retries: list) -> pb.PredictResponse:
    """`call`, and once more if it fails (what a client with one retry sees)."""
    try:
        return call()
    except grpc.RpcError as error:
        retries.append((time.monotonic(), f"{error.code().name}: {error.details()}"))
        return call()


def longest_pause(times: list[float], start: float, end: float) -> float:
    """The longest interval between consecutive `times` inside [start, end] (bounds included)."""
    inside = sorted([start, *(t for t in times if start <= t <= end), end])
    return max(later - earlier for earlier, later in itertools.pairwise(inside))


# ---------------------------------------------------------------- a. several trainers share the work


def test_the_ha_stack_spreads_jobs_over_the_trainers_and_serves_them(
    healthy_ha_stack, trainers, record_property
):
    stack = healthy_ha_stack
    primary, replica = wait_for_ha(stack)
    assert (primary, replica) == ("redis", "redis-replica")
    for sentinel in SENTINELS:  # each knows the replica and the two other Sentinels
        _, output = stack.container(sentinel).exec_run(
            ["redis-cli", "-p", str(SENTINEL_PORT), "SENTINEL", "master", REDIS_MASTER_NAME]
        )
        fields = output.decode().split()
        state = dict(zip(fields[::2], fields[1::2], strict=False))
        assert (state["num-slaves"], state["num-other-sentinels"], state["flags"]) == ("1", "2", "master")

    started = time.monotonic()
    jobs = [
        trainers.client().start_job(
            f"ha-spread-{index}", "digits", preset="digits-cnn", hyperparameters={"epochs": 2, "seed": index}
        )
        for index in range(SPREAD_JOBS)
    ]
    finals = [trainers.finished(job.job_id) for job in jobs]
    elapsed = time.monotonic() - started
    assert [job_state_name(final.state) for final in finals] == ["SUCCEEDED"] * SPREAD_JOBS, [
        f.error for f in finals
    ]
    owners = succeeded_on(stack, [job.job_id for job in jobs])
    assert set(owners) == {job.job_id for job in jobs}
    assert len(set(owners.values())) >= 2, f"every job ran on one trainer: {owners}"
    print(
        f"\n{SPREAD_JOBS} jobs in {elapsed:.1f} s on {len(set(owners.values()))} trainer replicas: {owners}"
    )
    record_property("spread_seconds", round(elapsed, 1))

    # Each replica of inference serves what any trainer published.
    sample = digits().x_test[:8]
    for final in finals[:2]:
        for address in stack.infer_addresses():
            client = Inference(stack, address)
            try:
                assert client.predict(final.model_name, sample).version == final.last_published_version
            finally:
                client.close()


# ---------------------------------------------------------------- b. the owner of a job is killed


def test_a_killed_trainer_replicas_job_is_taken_over_by_another(healthy_ha_stack, trainers, record_property):
    stack = healthy_ha_stack
    model = "ha-takeover"
    job = trainers.client().start_job(
        model,
        "digits",
        preset="digits-cnn",
        hyperparameters={"epochs": LONG_EPOCHS, "seed": 11},
        every_steps=50,
        every_epoch=False,
    )
    before = trainers.wait_job(
        job.job_id, lambda j: j.last_published_version >= 2, "a second checkpoint", TRAIN_TIMEOUT
    )
    owner = lease_owner(stack, job.job_id)
    assert owner is not None, "a running job without a lease"
    victim = trainer_of(stack, owner)
    trainers.close()  # it may be the victim's port

    killed_at, killed_wall = time.monotonic(), time.time()
    victim.kill()  # SIGKILL; no restart (a kill through the engine)
    try:
        victim.reload()
        assert victim.status == "exited"
        new_owner = wait_lease_taken(stack, job.job_id, owner)
        leased_at = time.monotonic()
        successor = trainer_of(stack, new_owner)
        assert successor.name != victim.name
        running = trainers.wait_job(
            job.job_id,
            lambda j: job_state_name(j.state) == "RUNNING" and j.restarts == 1,
            "resumed",
            TAKEOVER_TIMEOUT,
        )
        running_at = time.monotonic()
        for _ in deadline_loop(f"a checkpoint from {successor.name}", TAKEOVER_TIMEOUT, 0.2):
            if firsts := [at for at, name, _ in published(stack, job.job_id) if name == successor.name]:
                break
        checkpoint_after = firsts[0] - killed_wall
        final = trainers.finished(job.job_id)
    finally:
        victim.start()
    assert job_state_name(final.state) == "SUCCEEDED", final.error
    assert final.restarts == 1
    assert running.restarts == 1
    assert final.progress.step == final.progress.steps_total > 0

    # Every version in the store, 1 to the last, each published once, in order, by the owner
    # of the moment: the old one up to the kill, the new one after.
    versions = stored_versions(trainers, model)
    assert versions == list(range(1, final.last_published_version + 1)), versions
    reported = published(stack, job.job_id)
    numbers = [version for _, _, version in reported]
    assert numbers == sorted(set(numbers)), reported
    assert set(numbers) <= set(versions)
    assert {name for at, name, _ in reported if at < killed_wall} == {victim.name}
    assert {name for at, name, _ in reported if at > killed_wall} == {successor.name}
    assert max(v for at, _, v in reported if at < killed_wall) >= before.last_published_version
    resumable = [text for _, name, text in trainer_log(stack) if name == successor.name]
    resumable = [text for text in resumable if "event=job_resumable" in text]
    assert any(f"job={job.job_id} restarts=1" in text for text in resumable), resumable

    figures = {
        "lease_taken_s": leased_at - killed_at,
        "running_again_s": running_at - killed_at,
        "next_checkpoint_s": checkpoint_after,
    }
    print(
        f"\ntake-over of {job.job_id} from {victim.name} to {successor.name}: lease taken "
        f"{figures['lease_taken_s']:.1f} s after the kill, RUNNING (restarts=1) "
        f"{figures['running_again_s']:.1f} s, its next checkpoint {figures['next_checkpoint_s']:.1f} s "
        f"(lease 10 s, scan 3 s: the defaults); versions 1-{final.last_published_version}"
    )
    for name, seconds in figures.items():
        record_property(name, round(seconds, 2))
    stack.wait_healthy()


# ---------------------------------------------------------------- c. the Redis primary is killed


def test_a_killed_redis_primary_fails_over_under_training_and_serving(
    healthy_ha_stack, trainers, record_property
):
    stack = healthy_ha_stack
    model = "ha-failover"
    sample = digits().x_test[:4]
    primary, replica = wait_for_ha(stack)
    job = trainers.client().start_job(
        model,
        "digits",
        preset="digits-cnn",
        hyperparameters={"epochs": LONG_EPOCHS, "seed": 12},
        every_steps=50,
        every_epoch=False,
    )
    trainers.wait_job(
        job.job_id, lambda j: j.last_published_version >= 1, "a first checkpoint", TRAIN_TIMEOUT
    )
    replicas = [Inference(stack, address) for address in stack.infer_addresses()]
    retries: list[tuple[float, str]] = []
    old_primary = stack.container(primary)
    try:
        for client in replicas:  # each loads the model before the fault
            client.predict(model, sample)
        calls: list[Callable[[], pb.PredictResponse]] = [
            functools.partial(retried_once, functools.partial(r.predict, model, sample), retries)
            for r in replicas
        ]
        with PredictLoop(calls) as loop:
            loop.wait_successes(20)
            trainers.wait_job(
                job.job_id, lambda j: j.last_published_version >= 2, "a second checkpoint", TRAIN_TIMEOUT
            )
            killed_at, killed_wall = time.monotonic(), time.time()
            old_primary.kill()  # kill -9; it stays down (a kill through the engine)
            for _ in deadline_loop("the Sentinels to promote the replica", FAILOVER_TIMEOUT, 0.1):
                if agreed_primary(stack) == replica and replication(stack, replica).get("role") == "master":
                    break
            promoted_at = time.monotonic()
            final = trainers.finished(job.job_id)
            loop.wait_successes(loop.successes() + 20)
            finished_at = time.monotonic()
        assert job_state_name(final.state) == "SUCCEEDED", final.error
        assert final.progress.step == final.progress.steps_total > 0
        # The failover is shorter than the lease: the job stayed with its trainer throughout.
        assert final.restarts == 0, "the job changed hands during the failover"
        # Inference answered throughout: no request failed after its one retry.
        assert loop.failures() == [], loop.failures()[:5]
        assert len(loop.between(killed_at, promoted_at)) > 0 or promoted_at - killed_at < 1

        # Versions: 1 to the last in the store, without a gap, each reported one among them and
        # loadable (checksum verified) from the promoted primary; publishing went on after it.
        versions = stored_versions(trainers, model)
        assert versions == list(range(1, final.last_published_version + 1)), versions
        reported = published(stack, job.job_id)
        numbers = [version for _, _, version in reported]
        assert numbers == sorted(set(numbers)), reported
        assert set(numbers) <= set(versions), (numbers, versions)
        after = [at for at, _, _ in reported if at > killed_wall]
        assert after, "nothing was published after the primary died"
        (loader, *_) = stack.containers("trainer", all=False)
        assert load_in_container(loader, model, versions) == versions
        for client in replicas:  # inference follows the new primary's publishes
            wait_until_serving(client, model, final.last_published_version, sample)

        before = [at for at, _, _ in reported if at <= killed_wall]
        publish_gap = min(after) - max(before) if before else float("nan")
        predict_gap = longest_pause(
            [at for at, ok, _ in loop.between(killed_at, finished_at) if ok], killed_at, promoted_at + 1
        )
        figures = {
            "promotion_s": promoted_at - killed_at,
            "publish_gap_s": publish_gap,
            "predict_gap_s": predict_gap,
            "predict_retries": float(len(retries)),
            "job_restarts": float(final.restarts),
        }
        print(
            f"\nfailover {primary} -> {replica}: promoted {figures['promotion_s']:.1f} s after the kill; "
            f"publishes paused {publish_gap:.1f} s (last before the kill to first after); the longest "
            f"pause between answered predicts {predict_gap:.2f} s; {len(retries)} predicts needed "
            f"their retry; {len(loop.outcomes)} predicts, versions 1-{final.last_published_version}; "
            f"the job's restarts: {final.restarts}"
        )
        for name, value in figures.items():
            record_property(name, round(value, 2))
        # What the trainers logged while publishing paused: the reason for the pause.
        for at, name, text in trainer_log(stack):
            if killed_wall <= at <= min(after) and ("WARNING" in text or "event=job_" in text):
                print(f"  +{at - killed_wall:5.1f} s {name}: {text[:300]}")
    finally:
        for client in replicas:
            client.close()
        old_primary.start()

    # The old primary comes back as a replica of the new one (the Sentinels reconfigure it).
    for _ in deadline_loop(f"{primary} to rejoin as a replica of {replica}", REJOIN_TIMEOUT, 0.5):
        if replica_in_sync(stack, replica) == primary:
            break
    assert agreed_primary(stack) == replica
