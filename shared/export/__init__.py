"""Tandem models in other runtimes' formats: onnx.py writes ONNX, for ONNX Runtime and Triton.

May import shared.nn, shared.checkpoints and the base modules. The onnx package
is an optional extra (tandem[onnx]): only shared.export.onnx imports it, so
importing this package never needs it.
"""
