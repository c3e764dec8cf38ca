"""The swarm tier: deploy/swarm/tandem-stack.yml on a single-node Swarm of a real engine.

The stack runs Redis with a replica and three Sentinels, three trainer replicas and three
inference replicas; the tests drive it from a container on its `clients` network
(tests/compose/swarm.py, tests/compose/swarm_client.py), since nothing is published. Under
a client loop that predicts through `dns:///infer:50052` with one retry, they roll the
inference service to a new image, kill a task, kill the trainer task that owns a job, and
scale inference 3 -> 5 -> 2. Every figure is printed and recorded (record_property). The
first test interrupts a pytest run with SIGINT while it deploys, and checks that nothing of
its stack, nor the Swarm it made, is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.compose.stack import REPO, find_engine
from tests.compose.swarm import GATEWAY_NETWORK, SETTINGS, STACK_LABEL, ClientStream, SwarmStack
from tests.helpers import wait_until

pytestmark = pytest.mark.compose

MODEL = "swarm-digits"
TRAIN_TIMEOUT = 300.0
TAKEOVER_TIMEOUT = 60.0  # the lease (10 s) + an orphan scan (3 s), with room for a loaded machine
LOOP_WARMUP = 20  # answers the client loop has before a fault
INTERRUPT_TIMEOUT = 300.0  # the interrupted run: build check, deploy under way, SIGINT, removal
# Runs its arguments with SIGINT handled as a terminal's Ctrl-C is: a background job of a
# non-interactive shell (CI's `setsid make test &`) starts with SIGINT ignored, and a Python
# started so never turns it into KeyboardInterrupt.
WITH_CTRL_C = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def outcomes(loop: ClientStream, start: float, end: float) -> dict[str, int]:
    """The loop's requests inside [start, end]: how many, how many failed at first, how many
    failed after their retry."""
    inside = [line for line in loop.snapshot() if start <= line["t"] <= end]
    return {
        "requests": len(inside),
        "failed_first": sum(1 for line in inside if line["first_error"]),
        "failed_after_retry": sum(1 for line in inside if not line["ok"]),
    }


@contextmanager
def client_loop(stack: SwarmStack) -> Iterator[ClientStream]:
    """Predictions in a loop inside the stack, answering before the caller's fault starts."""
    loop = stack.stream("loop", MODEL)
    try:
        loop.wait_for(lambda line: len(loop.lines) >= LOOP_WARMUP, "answers from the loop", 60)
        yield loop
    finally:
        loop.stop()


def errors_of(loop: ClientStream) -> list[str]:
    return [line["error"] for line in loop.snapshot() if not line["ok"]][:5]


@pytest.fixture(scope="module")
def trained(swarm_stack) -> int:
    """A model trained on the stack and published: its last version."""
    job_id = swarm_stack.client("start", MODEL, "3")["job_id"]
    follow = swarm_stack.stream("follow", job_id)
    try:
        final = follow.wait_for(
            lambda line: line.get("state") in ("SUCCEEDED", "FAILED"), "its end", TRAIN_TIMEOUT
        )
    finally:
        follow.stop()
    assert final["state"] == "SUCCEEDED", final
    return final["last_published_version"]


# ---------------------------------------------------------------- clean-up on Ctrl-C


def test_ctrl_c_while_the_stack_deploys_leaves_nothing_behind(images):
    engine = find_engine().client
    assert engine is not None
    swarm_before = engine.info()["Swarm"]["LocalNodeState"]
    gateway_before = bool(engine.networks.list(names=[GATEWAY_NETWORK]))
    test = f"{Path(__file__).relative_to(REPO)}::test_the_stack_trains_and_every_inference_replica_serves"
    run = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WITH_CTRL_C,
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            test,
        ],
        cwd=REPO,
        env={**os.environ, "REQUIRE_DOCKER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        name = wait_for_a_new_stack(engine, run, INTERRUPT_TIMEOUT)
        os.killpg(run.pid, signal.SIGINT)
        output, _ = run.communicate(timeout=INTERRUPT_TIMEOUT)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    label = {"label": f"{STACK_LABEL}={name}"}
    left = [c.name for c in engine.containers.list(all=True, ignore_removed=True, filters=label)]
    left += [v.name for v in engine.volumes.list(filters=label)]
    left += [n.name for n in engine.networks.list(filters=label)]
    left += [str(path) for path in Path(tempfile.gettempdir()).glob(f"{name}-secrets-*")]
    assert left == [], output[-3000:]
    assert engine.info()["Swarm"]["LocalNodeState"] == swarm_before
    if swarm_before == "active":  # a Swarm that was there: only the stack's own part went
        assert not engine.services.list(filters=label) and not engine.secrets.list(filters=label)
    assert bool(engine.networks.list(names=[GATEWAY_NETWORK])) == gateway_before
    print(f"\nSIGINT during the deploy of {name}: nothing left; the Swarm is {swarm_before!r} again")


def wait_for_a_new_stack(engine, run: subprocess.Popen, timeout: float) -> str:
    """The name of the swarm test stack that `run` deploys, once its services exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, (
            f"the run ended before deploying: {run.stdout.read()[-3000:] if run.stdout else ''}"
        )
        if engine.info()["Swarm"]["LocalNodeState"] == "active":
            for service in engine.services.list():
                name = service.attrs["Spec"]["Labels"].get(STACK_LABEL, "")
                if name.startswith("tandem-swarm-test-"):
                    return name
        time.sleep(0.5)
    pytest.fail(f"no swarm test stack was deployed within {timeout} s")


# ---------------------------------------------------------------- the stack at work


def test_the_stack_trains_and_every_inference_replica_serves(swarm_stack, trained):
    stack = swarm_stack
    version = trained
    assert version >= 1
    answers = stack.client("replicas", MODEL)
    assert {answer["address"] for answer in answers} == stack.task_addresses("infer")
    assert [answer.get("version") for answer in answers] == [version] * 3, answers
    # Redis and the Sentinels are on the backend network only: a client cannot even name them.
    assert stack.client("resolves", "redis") == [] and stack.client("resolves", "sentinel-1") == []
    assert len(stack.client("resolves", "trainer")) == 3


def test_a_rolling_update_of_inference_fails_no_request_after_one_retry(
    swarm_stack, trained, record_property
):
    stack = swarm_stack
    base = stack.env.get("TANDEM_INFER_IMAGE", "tandem-infer:latest")
    release = stack.tag_new_image(base, f"{stack.project}-2")
    state, counts, seconds = updated_under_a_client_loop(stack, release)
    assert state == "completed"
    assert images_of(stack, "infer") == {release}
    print(f"\nrolling update of 3 inference tasks to {release} in {seconds:.1f} s: {counts}")
    record_property("rolling_update_s", round(seconds, 1))
    for name, count in counts.items():
        record_property(f"rolling_update_{name}", count)


def test_a_release_that_cannot_start_is_rolled_back_under_a_client_loop(
    swarm_stack, trained, record_property
):
    """A release whose inference refuses its settings at start (a malformed address in a setting
    the stack does not set, so the image's own value counts): its first new task exits, Swarm
    rolls the service back, and the old tasks serve throughout."""
    stack = swarm_stack
    (current,) = images_of(stack, "infer")
    broken = stack.tag_new_image(current, f"{stack.project}-broken", "ENV INFER_HEALTH_LISTEN=nowhere")
    state, counts, seconds = updated_under_a_client_loop(stack, broken)
    assert state == "rollback_completed"
    assert images_of(stack, "infer") == {current}
    print(f"\na release that cannot start was rolled back in {seconds:.1f} s: {counts}")
    record_property("rollback_s", round(seconds, 1))
    record_property("rollback_failed_first", counts["failed_first"])


def updated_under_a_client_loop(stack: SwarmStack, image: str) -> tuple[str, dict[str, int], float]:
    """A rolling update of inference to `image` under a client loop that must see no failure
    after its retry: the update's final state, the loop's outcomes meanwhile, its seconds."""
    with client_loop(stack) as loop:
        started = time.time()
        state = stack.update_image("infer", image)
        ended = time.time()
        stack.wait_converged()
    counts = outcomes(loop, started, ended)
    assert counts["requests"] >= 50, counts
    assert counts["failed_after_retry"] == 0, errors_of(loop)
    return state, counts, ended - started


def images_of(stack: SwarmStack, service: str) -> set[str]:
    """The images the service's healthy tasks run."""
    return {task["Spec"]["ContainerSpec"]["Image"] for task in stack.healthy_tasks(service)}


def test_a_killed_inference_task_is_rescheduled(swarm_stack, trained, record_property):
    stack = swarm_stack
    (victim, *_) = stack.healthy_tasks("infer")
    container = stack.docker.containers.get(victim["Status"]["ContainerStatus"]["ContainerID"])
    with client_loop(stack) as loop:
        killed = time.time()
        container.kill()  # SIGKILL: the task fails, and Swarm starts another
        stack.wait_converged()
        healthy = time.time()
    assert victim["ID"] not in {task["ID"] for task in stack.healthy_tasks("infer")}
    counts = outcomes(loop, killed, healthy)
    print(f"\na killed inference task was replaced, healthy, in {healthy - killed:.1f} s: {counts}")
    assert counts["failed_after_retry"] == 0, errors_of(loop)
    record_property("reschedule_s", round(healthy - killed, 1))
    record_property("reschedule_failed_first", counts["failed_first"])


def test_a_killed_trainer_tasks_job_is_taken_over(swarm_stack, trained, record_property):
    stack = swarm_stack
    job_id = stack.client("start", f"{MODEL}-takeover", "15")["job_id"]
    follow = stack.stream("follow", job_id)
    try:
        with client_loop(stack) as loop:
            before = follow.wait_for(
                lambda line: line.get("state") == "RUNNING" and line["last_published_version"] >= 2,
                "a second checkpoint",
                TRAIN_TIMEOUT,
            )
            owner = before["trainer"]
            (victim,) = [
                c
                for c in stack.containers("trainer", all=False)
                if c.attrs["Config"]["Hostname"] == owner.split(":")[0]
            ]
            killed = time.time()
            victim.kill()
            resumed = follow.wait_for(
                lambda line: line["t"] > killed and line.get("state") == "RUNNING" and line["restarts"] == 1,
                "the job running again",
                TAKEOVER_TIMEOUT,
            )
        final = follow.wait_for(
            lambda line: line.get("state") in ("SUCCEEDED", "FAILED"), "its end", TRAIN_TIMEOUT
        )
    finally:
        follow.stop()
    assert resumed["trainer"] != owner and resumed["trainer"].split(":")[0] != owner.split(":")[0]
    assert final["state"] == "SUCCEEDED" and final["restarts"] == 1, final
    assert final["last_published_version"] > before["last_published_version"]
    counts = outcomes(loop, killed, resumed["t"])
    assert counts["failed_after_retry"] == 0, errors_of(loop)
    stack.wait_converged()  # Swarm replaced the killed trainer task
    seconds = resumed["t"] - killed
    print(
        f"\nthe killed trainer task {victim.name}'s job ran on {resumed['trainer']} after {seconds:.1f} s; "
        f"predictions meanwhile: {counts}"
    )
    record_property("trainer_takeover_s", round(seconds, 1))


def test_scaling_inference_3_5_2_under_a_client_loop(swarm_stack, trained, record_property):
    stack = swarm_stack
    version = trained
    spread = {}  # replicas -> seconds until the loop reached every task
    resolved = {}  # replicas -> seconds after convergence until `infer` resolved to the tasks alone
    with client_loop(stack) as loop:
        started = time.time()
        for replicas in (5, 2):
            stack.scale("infer", replicas)
            resolved[replicas] = wait_until_the_name_resolves_to_the_tasks(stack)
            answers = stack.client("replicas", MODEL)
            assert {answer["address"] for answer in answers} == stack.task_addresses("infer")
            assert [answer.get("version") for answer in answers] == [version] * replicas, answers
            spread[replicas] = wait_until_every_task_serves_the_loop(stack)
        ended = time.time()
    counts = outcomes(loop, started, ended)
    print(
        f"\ninference scaled 3 -> 5 -> 2 in {ended - started:.1f} s: {counts}; the loop reached "
        f"all 5 tasks within {spread[5]:.1f} s, both of 2 within {spread[2]:.1f} s (connections "
        f"closed at {SETTINGS['INFER_MAX_CONNECTION_AGE_SECONDS']} s); the name resolved to the "
        f"tasks alone {resolved[5]:.1f} s and {resolved[2]:.1f} s after Swarm reported them running"
    )
    assert counts["failed_after_retry"] == 0, errors_of(loop)
    record_property("scale_failed_first", counts["failed_first"])
    record_property("scale_out_spread_s", round(spread[5], 1))


def wait_until_the_name_resolves_to_the_tasks(stack: SwarmStack, timeout: float = 60.0) -> float:
    """Until `infer` resolves to the healthy tasks and nothing else; the seconds that took.

    Swarm reports a scale-down converged once the remaining tasks run, while the tasks it stops
    stay in the name's DNS answers until they are gone (each may take its stop grace period), so
    a client that resolves at once still finds them; what a client is promised is the name's
    answer a little later."""
    started = time.monotonic()
    wait_until(
        lambda: set(stack.client("resolves", "infer")) == stack.task_addresses("infer"),
        "`infer` to resolve to its running tasks alone",
        timeout,
    )
    return time.monotonic() - started


def wait_until_every_task_serves_the_loop(stack: SwarmStack) -> float:
    """Until each inference task has answered more of the loop's calls than it had now: the
    client found the new tasks (INFER_MAX_CONNECTION_AGE_SECONDS makes it resolve again)."""
    before = stack.client("served", MODEL)
    started = time.monotonic()
    deadline = started + 3 * float(SETTINGS["INFER_MAX_CONNECTION_AGE_SECONDS"]) + 30
    while time.monotonic() < deadline:
        now = stack.client("served", MODEL)
        if now.keys() == before.keys() and all(now[a] > before[a] for a in now):
            return time.monotonic() - started
        time.sleep(1)
    pytest.fail(f"the client loop did not reach every task within the bound: {before} -> {now}")
