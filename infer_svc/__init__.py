"""The inference service: serves the checkpoints in Redis over gRPC (Tandem's API and the Open
Inference Protocol) and over HTTP/REST (the Open Inference Protocol), hot-reloading new
versions. `python -m infer_svc` runs it.

May import shared (not shared.cli, shared.client or shared.embedded); never trainer_svc.
"""
