"""The compose tier: docker-compose.yml on a real Docker engine, driven from this machine;
and the swarm tier: deploy/swarm/tandem-stack.yml on a single-node Swarm of that engine.

Base images prepared if missing (scripts/prepare_offline_images.sh) and
images built once per session (`images`); one stack of docker-compose.yml for
test_stack.py (`stack`), one of docker-compose.yml with docker-compose.ha.yml
for the HA tests' module (`ha_stack`, its own project), and one swarm stack for
the swarm tests' module (`swarm_stack`, tests/compose/swarm.py). Each is up and healthy
before its tests, and removed at its fixture's end: after a failure, after
Ctrl-C (pytest tears fixtures down on KeyboardInterrupt; SIGTERM and SIGHUP
are turned into one), and from atexit if anything got past that.

Without an engine (or without Compose v2, or without the Docker SDK) every
test here is skipped with a loud line at the start and at the end of the run;
with REQUIRE_DOCKER=1 they fail instead. When a test fails, the services'
logs are added to its report.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
from dataclasses import dataclass, field

import pytest

from tests.compose.stack import Engine, Stack, StackError, find_engine
from tests.compose.swarm import SwarmStack

REQUIRE_DOCKER = os.environ.get("REQUIRE_DOCKER", "").lower() in ("1", "true", "yes")
_MESSAGE = pytest.StashKey[str]()


@dataclass
class _Session:
    stacks: list[Stack] = field(default_factory=list)  # every stack made, for logs and timings
    build_timings: dict[str, float] = field(default_factory=dict)


_session = _Session()


@functools.cache
def engine() -> Engine:
    return find_engine()


def _loud(reporter, message: str) -> None:
    """A line of "!", the message, another line of "!": hard to miss in any output."""
    title, _, detail = message.partition(": ")
    reporter.ensure_newline()
    reporter.write_sep("!", title, red=True, bold=True)
    reporter.write_line(detail, red=True, bold=True)
    reporter.write_sep("!", red=True, bold=True)


@pytest.hookimpl(trylast=True)  # after `-m` deselection: no engine check when the tier is not run
def pytest_collection_modifyitems(config, items):
    tier = [item for item in items if item.get_closest_marker("compose")]
    if not tier or engine().ok:
        return
    if REQUIRE_DOCKER:
        message = f"COMPOSE TIER FAILS: REQUIRE_DOCKER=1 but {engine().problem}; its {len(tier)} tests fail"
    else:
        message = (
            f"COMPOSE TIER SKIPPED: {engine().problem}; its {len(tier)} tests did not run "
            f"(REQUIRE_DOCKER=1 turns this into a failure)"
        )
        skip = pytest.mark.skip(reason=message)
        for item in tier:
            item.add_marker(skip)
    config.stash[_MESSAGE] = message
    if (reporter := config.pluginmanager.get_plugin("terminalreporter")) is not None:
        _loud(reporter, message)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if message := config.stash.get(_MESSAGE, None):
        _loud(terminalreporter, message)
    if _session.build_timings:
        timings = ", ".join(f"{what} {seconds:.1f} s" for what, seconds in _session.build_timings.items())
        terminalreporter.write_sep("-", f"compose tier images: {timings}")
    for current in _session.stacks:
        if current.timings:
            timings = ", ".join(f"{what} {seconds:.1f} s" for what, seconds in current.timings.items())
            terminalreporter.write_sep("-", f"compose tier ({current.project}): {timings}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.failed and item.get_closest_marker("compose")):
        return
    for current in _session.stacks:
        if current.started and not current.removed:
            report.sections.append(
                (f"compose logs ({current.project}, last lines per service)", current.logs())
            )


class _Teardown:
    """Take the stack down exactly once: at the fixture's end, on SIGTERM/SIGHUP, or at exit.

    The first SIGTERM or SIGHUP is handled like Ctrl-C (pytest stops and tears the
    session's fixtures down). While `down` runs, SIGINT, SIGTERM and SIGHUP are ignored,
    so that an impatient second Ctrl-C cannot leave containers or volumes behind;
    `down` itself is bounded (stack.DOWN_TIMEOUT).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self, stack: Stack):
        self.stack = stack
        self.previous = {}
        self.done = False
        for signum in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: rely on the fixture and atexit
                self.previous[signum] = signal.signal(signum, self._interrupt)
        atexit.register(self.run)

    def _interrupt(self, signum, frame):
        for other in self.SIGNALS:  # once: a second signal must not break the teardown
            signal.signal(other, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def run(self) -> None:
        if self.done:
            return
        shielded = (signal.SIGINT, *self.SIGNALS)
        try:
            before = {signum: signal.signal(signum, signal.SIG_IGN) for signum in shielded}
        except ValueError:  # not the main thread
            before = {}
        try:
            self.stack.down()
            self.done = True
            atexit.unregister(self.run)
        finally:
            for signum, handler in before.items():
                signal.signal(signum, self.previous.get(signum, handler))


def _require_engine() -> Engine:
    if not engine().ok:
        if REQUIRE_DOCKER:
            pytest.fail(f"REQUIRE_DOCKER=1 but {engine().problem}", pytrace=False)
        pytest.skip(f"COMPOSE TIER SKIPPED: {engine().problem}")
    return engine()


@pytest.fixture(scope="session")
def images() -> None:
    """Base images prepared if missing, and the stacks' images built: once per session."""
    builder = Stack(_require_engine())
    try:
        builder.prepare_base_images()
        builder.build()
    except (StackError, OSError) as error:
        raise StackError(f"building the images: {error}") from None
    finally:
        builder.discard()
        _session.build_timings.update(builder.timings)


def _running(current: Stack):
    """`current` up and healthy while the caller uses it; always taken down afterwards."""
    _session.stacks.append(current)
    teardown = _Teardown(current)
    try:
        try:
            current.up()
            current.wait_healthy()
        except (StackError, OSError) as error:
            logs = current.logs() if current.started else "(the stack was not started)"
            raise StackError(f"{error}\n---- compose logs ----\n{logs}") from None
        yield current
    finally:
        teardown.run()


@pytest.fixture(scope="module")
def stack(images):
    """docker-compose.yml. Module-scoped like the others: one stack at a time runs (the machine is small)."""
    yield from _running(Stack(_require_engine()))


@pytest.fixture(scope="module")
def ha_stack(images):
    """docker-compose.yml with docker-compose.ha.yml: three trainers, a Redis that fails over.

    Module-scoped: it is down before another module's stack comes up (the machine is small).
    """
    yield from _running(Stack.ha(_require_engine()))


@pytest.fixture(scope="module")
def swarm_stack(images):
    """deploy/swarm/tandem-stack.yml on a single-node Swarm, with a driver container inside it.

    Module-scoped, like `ha_stack`.
    """
    yield from _running(SwarmStack(_require_engine()))


@pytest.fixture
def healthy_stack(stack) -> Stack:
    """The stack with every container running and healthy (an earlier test may have stopped one)."""
    for service in stack.services:
        for container in stack.containers(service):
            if container.status in ("exited", "created"):
                container.start()
    stack.wait_healthy()
    return stack
