"""Generated gRPC stubs for Tandem's wire contracts (proto/*.proto).

    from shared.rpc.stubs import tandem_trainer_pb2, tandem_trainer_pb2_grpc

Modules, one set per proto file: NAME_pb2 (messages), NAME_pb2_grpc
(service stubs and servicers) and their typing stubs (.pyi, mypy-protobuf):

- tandem_common: Tensor, CheckpointInfo (package tandem.v1)
- tandem_trainer: service tandem.v1.Trainer
- tandem_inference: service tandem.v1.Inference
- grpc_service: the Open Inference Protocol (KServe v2),
  service inference.GRPCInferenceService

Do not edit the generated files: change the .proto and run `make protos`
(scripts/gen_protos.py); tests/test_protos.py fails when they drift.
"""
