"""Conversions both services make between domain data and protobuf messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from shared.rpc import tandem_common_pb2


def timestamp(seconds: float) -> Timestamp | None:
    """A Timestamp from Unix seconds; None for 0 (not yet happened)."""
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def checkpoint_info(meta: dict, latest: bool = False) -> tandem_common_pb2.CheckpointInfo:
    """A CheckpointInfo from a checkpoint's metadata (the store's version listing)."""
    created = datetime.fromisoformat(meta["created_at"]).timestamp() if meta.get("created_at") else 0
    return tandem_common_pb2.CheckpointInfo(
        model_name=meta["model_name"], version=meta["version"], step=meta.get("step", 0),
        epoch=meta.get("epoch", 0),
        metrics={k: float(v) for k, v in meta.get("metrics", {}).items()
                 if isinstance(v, (int, float))},
        dataset=meta.get("dataset", ""), created_at=timestamp(created), sha256=meta.get("sha256", ""),
        size_bytes=meta.get("size_bytes", 0), latest=latest, dtype=meta.get("dtype", ""))
