"""Smoke test of the training-speed benchmark: it measures, on a tiny config
and without the torch peer. It checks that figures come out, never how fast."""

from dataclasses import replace

from bench.common import Timing, limited_threads
from bench.train_speed import BREAKDOWN_CASE, CASES, layer_breakdown, measure_throughput

TINY = Timing(rounds=2, block_seconds=0.005, warmup_calls=1)


def test_throughput_is_measured_for_every_model_without_torch():
    cases = [replace(case, batch_size=4) for case in CASES]
    with limited_threads(1):
        results = measure_throughput(cases, TINY, torch=None)
    assert [r["model"] for r in results] == [case.preset for case in CASES]
    for r in results:
        assert r["ours_samples_per_s"] > 0
        assert r["torch_samples_per_s"] is None and r["ratio"] is None


def test_layer_breakdown_times_every_part():
    with limited_threads(1):
        rows = layer_breakdown(replace(BREAKDOWN_CASE, batch_size=4), TINY)
    assert [r["part"] for r in rows[-2:]] == ["sum of the parts", "whole step, measured"]
    assert all(r["total_ms"] > 0 for r in rows if "conv2d" in r["part"])
    assert rows[-1]["total_ms"] > 0
