"""Smoke tests of the training-speed benchmark (on a tiny config and without the torch peer)
and of the serving benchmark (on a Redis of the test's own). They check that figures come
out, never how fast."""

from dataclasses import replace

from bench import serve_speed
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


def test_serving_is_measured_against_the_in_process_forward(private_redis):
    tiny = serve_speed.Settings(
        timing=Timing(rounds=1, block_seconds=0.01, warmup_calls=1), publishes=2, breakdown=TINY
    )
    with limited_threads(1):
        results = serve_speed.measure(private_redis.url, tiny)
    throughput = results["throughput"]
    assert [(r["batch"], r["clients"]) for r in throughput] == [
        (rows, clients) for rows in serve_speed.BATCHES for clients in (None, *serve_speed.CONCURRENCY)
    ]
    assert all(r["samples_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in throughput)
    assert all((r["ratio"] is None) == (r["clients"] is None) for r in throughput)
    assert results["batching"]["gain"] > 0
    assert results["reload"]["missed"] == 0 and results["reload"]["p50_ms"] > 0
    breakdown = results["breakdown"]
    assert {r["batch"] for r in breakdown} == {1, 256}
    assert all(r["us"] > 0 for r in breakdown)


def test_the_pools_throughput_is_measured_on_trainer_processes(private_redis, tmp_path):
    from bench import pool_speed

    assert pool_speed.jobs_per_hour(private_redis.url, tmp_path, 2, "smoke", epochs=1) > 0
