"""Checkpoints: the file format (checkpoint.py), the versioned store in Redis (store.py),
the one Redis client every part connects with (redis_client.py), and retry backoff.

May import shared.nn and the base modules (shared.env, shared.limits, shared.dtypes); never gRPC.
"""
