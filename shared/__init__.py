"""What both services, the CLI and the tests share, in packages that each do one job.

Each package imports only those listed after it (never one listed before it):

    cli/          the `tandem` command                      (may import everything below)
    client/       Python clients of the two services         (rpc, security, base)
    embedded/     a Redis for local runs and tests only      (checkpoints, base)
    export/       models as ONNX files (onnx: tandem[onnx])  (checkpoints, nn, base)
    security/     TLS, tokens and roles, certificates, Redis users   (base)
    rpc/          gRPC: stubs, conversions, errors, servers  (base)
    checkpoints/  the checkpoint format and its Redis store  (nn, base)
    nn/           the NumPy learning core                    (data, base)
    data/         datasets                                   (base)
    base: dtypes.py, env.py, limits.py, parent_death.py, version.py  (nothing of ours)

The services (trainer_svc, infer_svc) may import everything but cli, client
and embedded; tests/test_architecture.py checks all of this.
"""
