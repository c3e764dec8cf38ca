"""The model registry (TF Serving's manager): which version of each model serves, and swaps.

- The registry serves the configured models, or, with none configured,
  any model asked for. Each served model has a policy: follow the latest
  version (default) or stay pinned to one. The registry loads that version
  at start (for the configured models; one not published yet loads when
  its first version is offered) or on first use (for any other model).
- `offer(name, version)` is how new versions arrive (from the version
  source: Pub/Sub announcements and periodic polls). Loading, verifying and
  warming up happen on a loader thread, off the request path; only then is
  the new servable swapped in, by replacing one dict entry. A request that
  already holds the old servable finishes on it.
- A version that fails to load or verify is logged and counted, and the
  last good version keeps serving; the next offer tries again.
- A request may name a specific version still in the store: it is loaded
  on demand and kept in a small LRU cache beside the served ones.
- A version is loaded once however many requests ask for it at the same
  time: the first loads it, the others wait for that load.
- Callbacks, for metrics and health: `on_loaded` after each version loads,
  `on_failed` after one fails verification, `on_swapped` once a version serves.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import asdict
from typing import Callable

from shared.checkpoint import CheckpointError
from shared.redis_client import StoreUnavailable
from shared.store import CheckpointNotFound, CheckpointStore
from infer_svc.servable import Servable

log = logging.getLogger("tandem.infer.registry")


class ModelUnavailable(RuntimeError):
    """A model that is known to exist cannot be served right now (e.g. Redis is down)."""


class Registry:
    def __init__(self, store: CheckpointStore, *, models: Iterable[str] = (),
                 pinned: dict[str, int] | None = None, extra_versions: int = 4,
                 on_loaded: Callable[[Servable], None] = lambda s: None,
                 on_failed: Callable[[str, int, Exception], None] = lambda n, v, e: None,
                 on_swapped: Callable[[Servable], None] = lambda s: None):
        self.store = store
        self.models = tuple(models)     # the only models served here; empty = any model asked for
        self.pinned = dict(pinned or {})
        self._served: dict[str, Servable] = {}
        self._extra: OrderedDict[tuple[str, int], Servable] = OrderedDict()
        self._extra_size = extra_versions
        self._loading: dict[tuple[str, int], Future] = {}   # loads in progress, for their waiters
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

    def model_names(self) -> list[str]:
        """The models to follow for new versions: those serving, and configured ones not loaded yet."""
        return sorted(set(self.models) | set(self.served()))

    def versions(self, name: str) -> list[dict]:
        """Metadata of each version of `name` a request can ask for, oldest first.

        The store's versions (as `CheckpointStore.versions` lists them), plus
        loaded ones it no longer holds, which serve on from memory; while
        Redis is down, the loaded ones alone.
        """
        with self._lock:
            loaded = [s for s in (self._served.get(name), *self._extra.values()) if s and s.name == name]
        try:
            listing = {meta["version"]: meta for meta in self.store.versions(name)}
        except StoreUnavailable:
            listing = {}
        for servable in loaded:
            listing.setdefault(servable.version, asdict(servable.meta))
        return [listing[version] for version in sorted(listing)]

    @property
    def ready(self) -> bool:
        """Ready once at least one model serves."""
        with self._lock:
            return bool(self._served)

    def get(self, name: str, version: int | None = None) -> Servable:
        """The servable to answer a request for `name` (and `version`, if one is asked for)."""
        if not self.serves(name):
            raise LookupError(f"model_name {name!r} is not served here; this server serves "
                              f"{', '.join(self.models)}")
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
        """Load and serve the version the model's policy wants (pinned, else latest)."""
        version = self.pinned.get(name) or self._latest_version(name)
        self._load(name, version, self._swap_in)
        return self.served()[name]

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

    def _wants(self, name: str, version: int) -> bool:
        with self._lock:
            current = self._served.get(name)
        if current is None:  # a configured model not loaded yet; any other loads on first use
            return name in self.models
        if name in self.pinned:
            return version == self.pinned[name] and current.version != version
        return version > current.version

    def _load_offers(self) -> None:
        while (offer := self._offers.get()) is not None:
            name, version = offer
            if not self._wants(name, version):
                continue
            try:  # a pinned model not loaded yet loads its pin, whichever version was offered
                self._load(name, self.pinned.get(name, version), self._swap_in)
            except Exception as error:  # noqa: BLE001 - the loader must outlive any one bad version
                log.warning("event=reload_failed model=%s version=%d error=%r", name, version, str(error))

    def _latest_version(self, name: str) -> int:
        version = self._store_call(name, lambda: self.store.latest_version(name))
        if version is None:
            raise CheckpointNotFound(f"model_name {name!r}: no such model in the store")
        return version

    def _load(self, name: str, version: int, install: Callable[[Servable], None]) -> Servable:
        """Load a version and `install` it (swap it in, or keep it as an extra version).

        Only one thread loads a given version: one that asks while the load is
        in progress waits for it, and one that asks after it was installed gets
        the installed servable.
        """
        key = (name, version)
        with self._lock:
            loading = self._loading.get(key)
            first = loading is None
            if first:
                if (installed := self._installed(name, version)) is not None:
                    return installed
                loading = self._loading[key] = Future()
        if not first:
            return loading.result()
        try:
            servable = self._load_now(name, version)
            install(servable)
        except BaseException as error:
            loading.set_exception(error)
            raise
        else:
            loading.set_result(servable)
            return servable
        finally:
            with self._lock:
                del self._loading[key]

    def _load_now(self, name: str, version: int) -> Servable:
        try:
            servable = self._store_call(name, lambda: Servable.load(self.store, name, version))
        except CheckpointError as error:
            self._on_failed(name, version, error)
            raise
        log.info("event=model_loaded model=%s version=%d", name, version)
        self._on_loaded(servable)
        return servable

    def _store_call(self, name: str, call):
        try:
            return call()
        except StoreUnavailable as error:
            raise ModelUnavailable(f"model_name {name!r} is not loaded and Redis is unavailable: "
                                   f"{error}") from None

    def _installed(self, name: str, version: int) -> Servable | None:
        """The loaded servable of that version, if any; the caller holds `_lock`."""
        current = self._served.get(name)
        if current is not None and current.version == version:
            return current
        return self._extra.get((name, version))

    def _keep_extra(self, servable: Servable) -> None:
        """Keep a version asked for by number in the LRU cache beside the served ones."""
        with self._lock:
            self._extra[(servable.name, servable.version)] = servable
            while len(self._extra) > self._extra_size:
                self._extra.popitem(last=False)

    def _swap_in(self, servable: Servable) -> None:
        """Serve `servable` if the policy prefers it (a slower, older load never wins)."""
        with self._lock:
            current = self._served.get(servable.name)
            pinned = self.pinned.get(servable.name)
            if current is not None and not (servable.version == pinned if pinned
                                            else servable.version > current.version):
                return
            self._served[servable.name] = servable
        log.info("event=model_swapped model=%s version=%d previous=%s", servable.name,
                 servable.version, current.version if current else None)
        self._on_swapped(servable)
