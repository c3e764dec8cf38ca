"""The model registry (TF Serving's manager): which version of each model serves, and swaps.

- The registry serves the configured models, or, with none configured,
  any model asked for. Each served model has a `VersionPolicy`: follow the
  latest version (default) or stay pinned to one. The registry loads the
  policy's version at start (for the configured models; one not published
  yet loads when its first version is offered) or on first use (for any
  other model).
- Availability first (TF Serving's availability-preserving policy): a model
  following the latest serves the newest stored version that verifies, so a
  replica that starts while `latest` is corrupt serves the version before
  it rather than nothing, and moves on when a newer good version arrives. A
  pinned model serves its pin or nothing.
- `offer(name, version)` is how new versions arrive (from the version
  source: Pub/Sub announcements and periodic polls). Loading, verifying and
  warming up happen on a loader thread, off the request path; only then is
  the new servable swapped in, by replacing one dict entry. A request that
  already holds the old servable finishes on it.
- A version that fails verification is logged, counted and remembered
  (`FailedVersions`): it is never fetched again, and the last good version
  keeps serving.
- A request may name a specific version still in the store: it is loaded
  on demand and kept in a small LRU cache beside the served ones.
- A version is loaded once however many requests ask for it at the same
  time: the first loads it, the others wait for that load.
- Callbacks, for metrics and health: `on_loaded` after each version loads,
  `on_failed` once for each version that fails verification, `on_swapped`
  once a version serves.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import asdict, dataclass

from infer_svc.servable import Servable
from shared.checkpoints.checkpoint import CheckpointError
from shared.checkpoints.redis_client import StoreUnavailable
from shared.checkpoints.store import CheckpointNotFound, CheckpointStore

log = logging.getLogger("tandem.infer.registry")

MAX_FAILED_VERSIONS = 256  # versions remembered as failed, over all models


class ModelUnavailable(RuntimeError):
    """A model that is known to exist cannot be served right now (e.g. Redis is down)."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which version of one model should serve: the latest that verifies (pin None), or the pin."""

    pin: int | None = None

    def candidates(self, stored: Iterable[int]) -> list[int]:
        """The versions to try serving, best first, until one verifies."""
        return [self.pin] if self.pin is not None else sorted(set(stored), reverse=True)

    def prefers(self, candidate: int, current: int | None) -> bool:
        """Whether `candidate` should replace `current` (None: nothing serves yet).

        Following the latest, a newer version replaces an older one and never
        the reverse, so a slower load of an older version never wins.
        """
        if self.pin is not None:
            return candidate == self.pin and current != self.pin
        return current is None or candidate > current


class FailedVersions:
    """The (model, version) pairs that failed verification, with their errors; the last `limit` kept.

    A published version never changes (shared.checkpoints.store hands out each number
    once), so a failure is permanent and the version is not fetched again.
    The exception is a Redis that lost its data: its counter starts again
    from 1, and a new, good version may come to carry a number that failed
    before. `latest` never goes down otherwise, so a `latest` below a
    model's newest failure means its store was reset: that model's failures
    are forgotten. (A reset store that reaches the failed number again before
    any lower `latest` is seen keeps skipping it until the next version: a
    rare case, logged, that one more publish ends.)
    """

    def __init__(self, limit: int = MAX_FAILED_VERSIONS):
        self._errors: OrderedDict[tuple[str, int], CheckpointError] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def error(self, name: str, version: int) -> CheckpointError | None:
        with self._lock:
            return self._errors.get((name, version))

    def add(self, name: str, version: int, error: CheckpointError) -> bool:
        """Remember a failure; False if it was already known."""
        with self._lock:
            if (name, version) in self._errors:
                return False
            self._errors[(name, version)] = error
            while len(self._errors) > self._limit:
                self._errors.popitem(last=False)
            return True

    def versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(version for model, version in self._errors if model == name)

    def note_latest(self, name: str, latest: int) -> None:
        """`latest` of `name` was read from the store: forget its failures if the store was reset."""
        with self._lock:
            stale = [key for key in self._errors if key[0] == name and key[1] > latest]
            if not stale:
                return
            for key in [key for key in self._errors if key[0] == name]:
                del self._errors[key]
        log.warning(
            "event=failures_forgotten model=%s latest=%d reason=%r",
            name,
            latest,
            f"latest is below failed versions {[v for _, v in stale]}: the store was reset",
        )


class Registry:
    def __init__(
        self,
        store: CheckpointStore,
        *,
        models: Iterable[str] = (),
        pinned: dict[str, int] | None = None,
        extra_versions: int = 4,
        on_loaded: Callable[[Servable], None] = lambda s: None,
        on_failed: Callable[[str, int, Exception], None] = lambda n, v, e: None,
        on_swapped: Callable[[Servable], None] = lambda s: None,
    ):
        self.store = store
        self.models = tuple(models)  # the only models served here; empty = any model asked for
        self.pinned = dict(pinned or {})
        self.failed = FailedVersions()
        self._served: dict[str, Servable] = {}
        self._extra: OrderedDict[tuple[str, int], Servable] = OrderedDict()
        self._extra_size = extra_versions
        self._loading: dict[tuple[str, int], Future] = {}  # loads in progress, for their waiters
        self._lock = threading.Lock()
        self._on_loaded, self._on_failed, self._on_swapped = on_loaded, on_failed, on_swapped
        self._offers: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self._loader = threading.Thread(target=self._load_offers, name="model-loader", daemon=True)
        self._loader.start()

    # ------------------------------------------------------------ reading

    def served(self) -> dict[str, Servable]:
        with self._lock:
            return dict(self._served)

    def serves(self, name: str) -> bool:
        """Whether `name` may be served here (it may not be loaded yet)."""
        return not self.models or name in self.models

    def policy(self, name: str) -> VersionPolicy:
        return VersionPolicy(self.pinned.get(name))

    def model_names(self) -> list[str]:
        """The models to follow for new versions: those serving, and configured ones not loaded yet."""
        return sorted(set(self.models) | set(self.served()))

    def versions(self, name: str) -> list[dict]:
        """Metadata of each version of `name` a request can ask for, oldest first.

        The store's versions (as `CheckpointStore.versions` lists them) but
        those that failed verification, plus loaded ones it no longer holds,
        which serve on from memory; while Redis is down, the loaded ones alone.
        """
        with self._lock:
            loaded = [s for s in (self._served.get(name), *self._extra.values()) if s and s.name == name]
        try:
            listing = {meta["version"]: meta for meta in self.store.versions(name)}
        except StoreUnavailable:
            listing = {}
        for version in self.failed.versions(name):
            listing.pop(version, None)
        for servable in loaded:
            listing.setdefault(servable.version, asdict(servable.meta))
        return [listing[version] for version in sorted(listing)]

    @property
    def ready(self) -> bool:
        """Ready when every configured model serves (Triton's strict readiness); with none, any one."""
        with self._lock:
            return all(name in self._served for name in self.models) if self.models else bool(self._served)

    def get(self, name: str, version: int | None = None) -> Servable:
        """The servable to answer a request for `name` (and `version`, if one is asked for)."""
        if not self.serves(name):
            raise LookupError(
                f"model_name {name!r} is not served here; this server serves {', '.join(self.models)}"
            )
        with self._lock:
            current = self._served.get(name)
            if current and version in (None, current.version):
                return current
            if version is not None and (name, version) in self._extra:
                self._extra.move_to_end((name, version))
                return self._extra[(name, version)]
        if version is None:
            return self.load_policy_version(name)
        return self._load(name, version, self._keep_extra)

    # ------------------------------------------------------------ loading

    def load_policy_version(self, name: str) -> Servable:
        """Serve what the model's policy wants: its pin, or the newest stored version that verifies.

        Versions known to have failed are skipped without a fetch; those
        that fail now are remembered. A version retention deleted since the
        listing is skipped too.
        """
        policy = self.policy(name)
        stored = () if policy.pin is not None else self._stored_versions(name)
        failures: list[tuple[int, Exception]] = []
        for version in policy.candidates(stored):
            try:
                servable = self._load(name, version, self._swap_in)
            except (CheckpointError, CheckpointNotFound) as error:
                failures.append((version, error))
                continue
            if failures:
                log.warning(
                    "event=model_fallback model=%s version=%d skipped=%s",
                    name,
                    servable.version,
                    ",".join(str(v) for v, _ in failures),
                )
            return self.served()[name]  # this version, or a newer one swapped in meanwhile
        if len(failures) == 1 or not any(isinstance(e, CheckpointError) for _, e in failures):
            raise failures[0][1]
        raise CheckpointError(
            f"model_name {name!r} has no stored version that verifies: "
            + "; ".join(f"version {v}: {e}" for v, e in failures)
        )

    def load_configured(self) -> None:
        """Load each configured model's policy version; one that cannot load yet waits for an offer."""
        for name in self.models:
            try:
                self.load_policy_version(name)
            except (CheckpointError, CheckpointNotFound, ModelUnavailable) as error:
                log.warning("event=model_not_loaded model=%s error=%r", name, str(error))

    def offer(self, name: str, version: int) -> None:
        """A version of `name` exists: load it in the background if the policy wants it."""
        self._offers.put((name, version))

    def close(self) -> None:
        self._offers.put(None)
        self._loader.join(timeout=5)

    def _load_offers(self) -> None:
        while (offer := self._offers.get()) is not None:
            name, version = offer
            self.failed.note_latest(name, version)  # offers carry `latest`, or a newer announcement
            with self._lock:
                current = self._served.get(name)
            try:
                if current is None:  # a configured model not loaded yet; any other loads on first use
                    if name in self.models:
                        self.load_policy_version(name)
                elif self.policy(name).prefers(version, current.version):
                    self._load(name, version, self._swap_in)
            except CheckpointError:
                continue  # each failed version was logged once, when it failed
            except Exception as error:  # noqa: BLE001 - the loader must outlive any one bad version
                log.warning("event=reload_failed model=%s version=%d error=%r", name, version, str(error))

    def _stored_versions(self, name: str) -> list[int]:
        """`latest` and every listed version of `name`; CheckpointNotFound for a model not in the store."""
        latest = self._store_call(name, lambda: self.store.latest_version(name))
        if latest is None:
            raise CheckpointNotFound(f"model_name {name!r}: no such model in the store")
        self.failed.note_latest(name, latest)
        listing = self._store_call(name, lambda: self.store.versions(name))
        return [latest, *(meta["version"] for meta in listing)]

    def _load(self, name: str, version: int, install: Callable[[Servable], None]) -> Servable:
        """Load a version and `install` it (swap it in, or keep it as an extra version).

        Only one thread loads a given version: one that asks while the load is
        in progress waits for it, and one that asks after it was installed gets
        the installed servable. Either installs it its own way too (a version
        first asked for by number may later be the one the policy serves), so
        installing must be idempotent. A version that failed verification
        before fails again at once, with its error, and is not fetched.
        """
        key = (name, version)
        mine: Future | None = None  # the load this thread does, if it is the first to ask
        with self._lock:
            servable = self._installed(name, version)
            loading = self._loading.get(key)
            if servable is None and loading is None:
                if (failure := self.failed.error(name, version)) is not None:
                    raise failure
                mine = self._loading[key] = Future()
        if mine is None:
            if servable is None:
                assert loading is not None  # not installed: another thread is loading it
                servable = loading.result()
            install(servable)
            return servable
        try:
            servable = self._load_now(name, version)
            install(servable)
        except BaseException as error:
            mine.set_exception(error)
            raise
        else:
            mine.set_result(servable)
            return servable
        finally:
            with self._lock:
                del self._loading[key]

    def _load_now(self, name: str, version: int) -> Servable:
        try:
            servable = self._store_call(name, lambda: Servable.load(self.store, name, version))
        except CheckpointError as error:
            if self.failed.add(name, version, error):
                log.warning("event=version_failed model=%s version=%d error=%r", name, version, str(error))
                self._on_failed(name, version, error)
            raise
        log.info("event=model_loaded model=%s version=%d", name, version)
        self._on_loaded(servable)
        return servable

    def _store_call(self, name: str, call):
        try:
            return call()
        except StoreUnavailable as error:
            raise ModelUnavailable(
                f"model_name {name!r} is not loaded and Redis is unavailable: {error}"
            ) from None

    def _installed(self, name: str, version: int) -> Servable | None:
        """The loaded servable of that version, if any; the caller holds `_lock`."""
        current = self._served.get(name)
        if current is not None and current.version == version:
            return current
        return self._extra.get((name, version))

    def _keep_extra(self, servable: Servable) -> None:
        """Keep a version asked for by number in the LRU cache beside the served ones."""
        with self._lock:
            if self._served.get(servable.name) is servable:
                return
            self._extra[(servable.name, servable.version)] = servable
            self._extra.move_to_end((servable.name, servable.version))
            while len(self._extra) > self._extra_size:
                self._extra.popitem(last=False)

    def _swap_in(self, servable: Servable) -> None:
        """Serve `servable` if the policy prefers it to the version serving now."""
        with self._lock:
            current = self._served.get(servable.name)
            if not self.policy(servable.name).prefers(servable.version, current.version if current else None):
                return
            self._served[servable.name] = servable
        log.info(
            "event=model_swapped model=%s version=%d previous=%s",
            servable.name,
            servable.version,
            current.version if current else None,
        )
        self._on_swapped(servable)
