"""The trainer service: a gRPC server that queues training jobs, runs them on shared.nn and
publishes their checkpoints to Redis (shared.checkpoints). `python -m trainer_svc` runs it.

May import shared (not shared.cli, shared.client or shared.embedded); never infer_svc.
"""
