"""Checkpoint publish and load through the Redis store, against plain SET/GET of the same bytes.

The peer is what any store must pay at least: moving the checkpoint's
bytes to Redis and back, with the same client (hiredis parsing replies,
redis-py's packer sending large values uncopied). Our extra work on top is,
on publish, the finite check and checksum (one pass each over the tensors,
which are sent from the model's arrays, uncopied), the transaction's
bookkeeping and announcements; on load, reading `latest`, the layout, the
checksum, the finite check and building the model (its weights are views
into the reply). Aims: publish at most 1.5x the plain SET, load at most
1.2x the plain GET. Runs against an embedded Redis on a unix socket (or
REDIS_URL when set).
"""

from __future__ import annotations

import redis

from bench.common import (
    Timing,
    interleaved_medians,
    print_facts,
    print_table,
    quick_mode,
    redis_session,
    write_json,
)
from shared.checkpoints import checkpoint
from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore
from shared.nn import Model, build_model
from shared.nn.presets import get_preset

AIMS = {"publish": 1.5, "load": 1.2}  # at most this many times the plain SET / GET
# (label, hidden widths of an mlp on 28x28 inputs): about 1 MB and about 20 MB of float32 weights.
SIZES = [("~1 MB", (256, 128, 100)), ("~20 MB", (2048, 1536))]


def run() -> None:
    timing = (
        Timing(rounds=3, block_seconds=0.3, warmup_calls=3)
        if quick_mode()
        else Timing(rounds=7, block_seconds=1.0, warmup_calls=5)
    )
    rows, results = [], []
    with redis_session() as (url, facts):
        client = connect(url)
        facts["redis"] = f"{client.info()['redis_version']} at {url.split('@')[-1]}"
        print_facts("Checkpoint store: publish and load vs plain SET/GET (same bytes)", facts)
        store = CheckpointStore(client, retention=2, prefix="bench")
        for label, hidden in SIZES:
            model = build_model(get_preset("mlp").spec((1, 28, 28), 10, hidden)).initialise(0)
            meta = CheckpointMeta(model_name="bench", spec={}, dtype="")
            blob = checkpoint.encode(model, meta)
            store.publish(model, meta)
            medians = _medians(store, client, model, meta, blob, timing)
            ratios = {
                "publish": medians["publish"] / medians["set"],
                "load": medians["load"] / medians["get"],
            }
            for what, peer in (("publish", "set"), ("load", "get")):
                rows.append(
                    [
                        label,
                        f"{len(blob) / 1e6:.1f}",
                        what,
                        f"{medians[what] * 1e3:.2f}",
                        f"{medians[peer] * 1e3:.2f}",
                        f"{ratios[what]:.2f}",
                        f"<= {AIMS[what]}x: " + ("pass" if ratios[what] <= AIMS[what] else "MISS"),
                    ]
                )
            results.append(
                {
                    "size": label,
                    "bytes": len(blob),
                    "hidden": list(hidden),
                    "ms": {k: v * 1e3 for k, v in medians.items()},
                    "publish_ratio": ratios["publish"],
                    "load_ratio": ratios["load"],
                }
            )
        client.delete(*client.keys("bench:*"))
    print()
    print_table(["checkpoint", "MB", "operation", "ours ms", "plain SET/GET ms", "ratio", "aim"], rows)
    print(f"\nwrote {write_json('store', {'facts': facts, 'aims': AIMS, 'results': results})}")


def _medians(
    store: CheckpointStore,
    client: redis.Redis,
    model: Model,
    meta: CheckpointMeta,
    blob: bytes,
    timing: Timing,
) -> dict[str, float]:
    """Median seconds of our publish and load, and of plain SET and GET of the same bytes."""
    return interleaved_medians(
        {
            "publish": lambda: store.publish(model, meta),
            "set": lambda: client.set("bench:plain", blob),
            "load": lambda: store.latest("bench"),
            "get": lambda: client.get("bench:plain"),
        },
        timing,
    )
