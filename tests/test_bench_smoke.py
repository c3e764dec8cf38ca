"""Smoke tests of the training-speed benchmark (on a tiny config and without the torch peer)
and of the serving benchmark (on a Redis of the test's own), and of the summary. They check
that figures come out, never how fast."""

import json
from dataclasses import replace

from bench import serve_speed, summary
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


def test_every_serving_row_gets_its_figures(private_redis):
    tiny = serve_speed.Settings(
        timing=Timing(rounds=1, block_seconds=0.05, warmup_calls=1),
        reload_publishes=2,
        rss_after=(1, 2, 3),
        peer_timing=TINY,
    )
    with limited_threads(1):
        results = serve_speed.measure(private_redis.url, tiny, with_mlserver=False)
    rows = serve_speed.rows_from(results)
    assert [r["row"] for r in rows] == [
        "empty gRPC call (health Check), 1 client: p50 / p99 (transport floor)",
        "Predict batch 1, 1 client: p50 / p99",
        "Predict batch 1, 32 clients",
        "dynamic batching gain, 32 single-sample clients",
        "Predict batch 256, 1 client vs in-process forward",
        "Predict batch 256, 8 clients vs in-process forward",
        "reload, publish -> first answer, 8 clients loading: p50 / p99",
        "server RSS after 1 reloads",
        "server RSS after 2 reloads",
        "server RSS after 3 reloads",
    ]
    for r in rows:
        assert r["ours"] > 0, r
        assert r["mark"] in ("pass", "MISS", "info"), r
        assert (r["ratio"] is None) == (r["peer"] is None) and (r["peer"] is None or r["peer"] > 0), r
    assert results["reload"]["missed"] == 0 and results["memory"]["missed"] == 0
    breakdown = results["contenders"]["b1 x1"]["where_time_goes"]
    assert breakdown["handler_ms"] > 0 and breakdown["rows_per_pass"] == 1


def test_the_pools_throughput_is_measured_on_trainer_processes(private_redis, tmp_path):
    from bench import pool_speed

    assert pool_speed.jobs_per_hour(private_redis.url, tmp_path, 2, "smoke", epochs=1) > 0


def test_the_summary_gathers_every_row_and_names_what_did_not_run(tmp_path):
    with limited_threads(1):
        throughput = measure_throughput([replace(CASES[0], batch_size=4)], TINY, torch=None)
    speed = {"machine": {"torch": "not installed"}, "throughput": [{"threads": 1, **r} for r in throughput]}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    (tmp_path / "store.json").write_text('{"results": "from an older bench"}')

    gathered = summary.gather(tmp_path)

    assert [r["row"] for r in gathered["rows"]] == [
        f"training, 1 thread(s): {CASES[0].preset} (batch 4, {throughput[0]['optimizer']})"
    ]
    assert gathered["rows"][0]["ours"] > 0 and gathered["rows"][0]["mark"] == "info"  # no torch, no verdict
    assert [m.split(" (")[0] for m in gathered["missing"]] == ["checkpoint store", "serving"]
    assert "| training, 1 thread(s)" in summary.markdown(gathered)
