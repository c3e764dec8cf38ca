"""Unit tests for trainer_svc.background.NewestOnly, the newest-only background worker.

What is tested: items are handled in order, on the worker's own thread; of
items submitted while one is being handled only the newest waits (the older
are superseded, never handled after a newer one); an item whose handler
raises StoreUnavailable is retried with exponential backoff (reset after a
success) until it succeeds, a newer item supersedes it, or the worker is
closed; `close(timeout)` flushes what is pending, cuts a backoff wait short,
and reports whether everything was handled; with an `outage_limit` the worker
stops with `error` set.

How: a `Recorder` subclass, defined here, whose `_handle` records each attempt
and can be made to block on an Event or to fail a given number of times. Real
threads; every wait is bounded (Event/Condition timeouts, `flush`), never a
sleep used as synchronisation. Backoff is configured short, so each test stays
well under 2 s.
"""

from __future__ import annotations

import threading
import time

import pytest

from shared.checkpoints.redis_client import StoreUnavailable
from trainer_svc.background import NewestOnly

WAIT = 2.0  # bound for every wait that should succeed at once
SHORT = (0.01, 0.04)  # backoff: 10 ms, doubling, up to 40 ms


class Recorder(NewestOnly):
    """Records every attempt (item, thread); blocks on `gates[item]`; fails `failures[item]` times.

    An item in `always_fail` fails every time.
    """

    def __init__(self, *, backoff=SHORT, outage_limit=None, failures=None, always_fail=(), gates=None):
        self.attempts: list = []  # every call of _handle, in order
        self.handled: list = []  # the items _handle returned for
        self.threads: set[int] = set()
        self.failed: list[tuple] = []  # (item, retry_in) per _failed call
        self.failures = dict(failures or {})
        self.always_fail = set(always_fail)
        self.gates = dict(gates or {})  # item -> Event it waits for before returning
        self.started = {}  # item -> Event set once its first attempt begins
        self.changed = threading.Condition()
        super().__init__("test-newest-only", backoff=backoff, outage_limit=outage_limit)

    def started_event(self, item) -> threading.Event:
        with self.changed:
            return self.started.setdefault(item, threading.Event())

    def _handle(self, item) -> None:
        with self.changed:
            self.attempts.append(item)
            self.threads.add(threading.get_ident())
            self.started.setdefault(item, threading.Event()).set()
            self.changed.notify_all()
        if item in self.gates:
            assert self.gates[item].wait(WAIT), "test never released the gate"
        if item in self.always_fail or self.failures.get(item, 0) > 0:
            if item in self.failures:
                self.failures[item] -= 1
            raise StoreUnavailable(f"no Redis for {item!r}")
        with self.changed:
            self.handled.append(item)
            self.changed.notify_all()

    def _failed(self, item, error, retry_in) -> None:
        assert isinstance(error, StoreUnavailable)
        with self.changed:
            self.failed.append((item, retry_in))
            self.changed.notify_all()

    def wait_until(self, predicate, timeout=WAIT) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)


@pytest.fixture
def workers():
    """Workers a test made; each is closed afterwards (and its gates opened) so no thread lingers."""
    made: list[Recorder] = []
    yield made
    for worker in made:
        for gate in worker.gates.values():
            gate.set()
        worker.always_fail.clear()
        if worker._thread.is_alive():
            worker.close(timeout=WAIT)


def make(workers, **kwargs) -> Recorder:
    worker = Recorder(**kwargs)
    workers.append(worker)
    return worker


# ------------------------------------------------------------ order and superseding


def test_items_are_handled_in_order_on_the_workers_thread(workers):
    worker = make(workers)
    for item in range(5):
        worker.submit(item)
        assert worker.flush(WAIT)
    assert worker.handled == [0, 1, 2, 3, 4]
    assert len(worker.threads) == 1 and threading.get_ident() not in worker.threads


def test_submit_returns_while_the_handler_is_blocked(workers):
    gate = threading.Event()
    worker = make(workers, gates={"slow": gate})
    worker.submit("slow")
    assert worker.started_event("slow").wait(WAIT)
    worker.submit("next")  # must not wait for "slow"
    assert worker.handled == []
    assert not worker.flush(0.05)  # something is still being handled
    gate.set()
    assert worker.flush(WAIT)
    assert worker.handled == ["slow", "next"]


def test_rapid_submits_handle_an_increasing_subsequence_ending_with_the_newest(workers):
    worker = make(workers)
    for item in range(300):
        worker.submit(item)
    assert worker.flush(WAIT)
    assert worker.handled[-1] == 299
    assert worker.handled == sorted(set(worker.handled)), "an older item was handled after a newer one"


def test_while_one_item_is_handled_only_the_newest_submitted_waits(workers):
    gate = threading.Event()
    worker = make(workers, gates={0: gate})
    worker.submit(0)
    assert worker.started_event(0).wait(WAIT)
    for item in (1, 2, 3):
        worker.submit(item)
    gate.set()
    assert worker.flush(WAIT)
    assert worker.handled == [0, 3]
    assert worker.attempts == [0, 3]


# ------------------------------------------------------------ retries


def test_a_failing_item_is_retried_with_exponential_backoff_until_it_succeeds(workers):
    worker = make(workers, failures={"a": 4})
    worker.submit("a")
    assert worker.flush(WAIT)
    assert worker.attempts == ["a"] * 5
    assert worker.handled == ["a"]
    assert worker.failed == [("a", 0.01), ("a", 0.02), ("a", 0.04), ("a", 0.04)]


def test_the_backoff_starts_again_from_the_first_delay_after_a_success(workers):
    worker = make(workers, failures={"a": 2, "b": 1})
    worker.submit("a")
    assert worker.flush(WAIT)
    worker.submit("b")
    assert worker.flush(WAIT)
    assert worker.failed == [("a", 0.01), ("a", 0.02), ("b", 0.01)]
    assert worker.handled == ["a", "b"]


def test_a_newer_item_supersedes_one_being_retried(workers):
    # Long backoff: "b" is submitted while "a" waits for its retry, and must not be
    # handled before that wait is over; "a" is never tried again after "b".
    worker = make(workers, backoff=(0.1, 0.1), always_fail={"a"})
    worker.submit("a")
    assert worker.wait_until(lambda: len(worker.failed) >= 2)
    worker.submit("b")
    assert worker.flush(WAIT)
    assert worker.handled == ["b"]
    first_b = worker.attempts.index("b")
    assert worker.attempts[:first_b] == ["a"] * first_b and first_b >= 2
    assert worker.attempts[first_b:] == ["b"]


def test_a_newer_item_submitted_during_a_failing_attempt_replaces_it(workers):
    # "b" arrives while "a" is in _handle; "a" then fails and must not be put back over "b".
    gate = threading.Event()
    worker = make(workers, gates={"a": gate}, always_fail={"a"})
    worker.submit("a")
    assert worker.started_event("a").wait(WAIT)
    worker.submit("b")
    gate.set()
    assert worker.flush(WAIT)
    assert worker.attempts == ["a", "b"]
    assert worker.failed == [("a", 0.01)]
    assert worker.handled == ["b"]


def test_an_item_failing_past_the_outage_limit_stops_the_worker_with_error(workers):
    worker = make(workers, backoff=(0.01, 0.01), outage_limit=0.05, always_fail={"a"})
    worker.submit("a")
    assert not worker.flush(WAIT)  # returns once error is set, not at the timeout
    assert isinstance(worker.error, StoreUnavailable)
    worker._thread.join(WAIT)
    assert not worker._thread.is_alive()
    assert worker.handled == []


# ------------------------------------------------------------ close


def test_close_handles_what_is_pending_retrying_it_and_reports_true(workers):
    worker = make(workers, failures={"last": 2})
    worker.submit("last")
    assert worker.close(timeout=WAIT) is True
    assert worker.handled == ["last"]
    assert not worker._thread.is_alive()


def test_close_cuts_a_backoff_wait_short_and_reports_false(workers):
    worker = make(workers, backoff=(30.0, 30.0), always_fail={"a"})
    worker.submit("a")
    assert worker.wait_until(lambda: worker.failed)  # now waiting 30 s for the retry
    began = time.monotonic()
    assert worker.close(timeout=0.1) is False
    assert time.monotonic() - began < 0.1 + 0.5
    assert not worker._thread.is_alive()
    assert worker.attempts == ["a"]  # dropped, not retried


def test_close_with_the_handler_blocked_returns_false_within_timeout_plus_its_join(workers):
    # close waits `timeout` for the flush, then at most 1 s for the thread to end.
    gate = threading.Event()
    worker = make(workers, gates={"stuck": gate})
    worker.submit("stuck")
    assert worker.started_event("stuck").wait(WAIT)
    began = time.monotonic()
    assert worker.close(timeout=0.05) is False
    assert time.monotonic() - began < 0.05 + 1.0 + 0.5
    gate.set()
    worker._thread.join(WAIT)
    assert not worker._thread.is_alive()


def test_after_close_nothing_more_is_handled_than_the_item_in_hand(workers):
    gate = threading.Event()
    worker = make(workers, gates={"stuck": gate})
    worker.submit("stuck")
    assert worker.started_event("stuck").wait(WAIT)
    worker.submit("pending")
    assert worker.close(timeout=0.05) is False
    worker.submit("after close")
    gate.set()
    worker._thread.join(WAIT)
    assert not worker._thread.is_alive()
    assert worker.handled == ["stuck"]
