"""The summary of a bench run: every figure with an aim, against its peer from the same run.

`python -m bench` ends with it. It gathers the rows of the results the
benchmarks wrote (bench/results/speed.json, store.json, serve.json): training
against torch at each thread count, checkpoint publish and load against plain
SET and GET of the same bytes, and serving (bench.serve_speed's rows: the
transport floor, the single-worker server, batching off, the in-process
forward, MLServer). It writes them to bench/results/summary.md and
summary.json, and prints the table. A benchmark that has not run is named
as missing, so the summary never passes off an old figure as a new one:
each row carries the time its results were written.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from bench.common import RESULTS_DIR, write_json
from bench.report import figure, print_rows, row

SOURCES = {"speed": "training", "store": "checkpoint store", "serve": "serving"}


def training_rows(speed: dict) -> list[dict]:
    torch = speed["machine"].get("torch", "torch")
    return [
        row(
            f"training, {r['threads']} thread(s): {r['model']} (batch {r['batch_size']}, {r['optimizer']})",
            r["ours_samples_per_s"],
            r["torch_samples_per_s"],
            f"torch {torch}, same model, weights, batch and threads",
            "samples/s",
            f">= {r['aim']:g}x",
            None if r["ratio"] is None else r["ratio"] >= r["aim"],
        )
        for r in speed["throughput"]
    ]


def store_rows(store: dict) -> list[dict]:
    rows = []
    for r in store["results"]:
        megabytes = r["bytes"] / 1e6
        for what, peer in (("publish", "set"), ("load", "get")):
            aim = store["aims"][what]
            rows.append(
                row(
                    f"checkpoint {what}, {megabytes:.1f} MB",
                    r["ms"][what],
                    r["ms"][peer],
                    f"plain {peer.upper()} of the same bytes",
                    "ms",
                    f"<= {aim:g}x",
                    r["ms"][what] / r["ms"][peer] <= aim,
                )
            )
    return rows


ROWS_OF = {"speed": training_rows, "store": store_rows, "serve": lambda serve: serve["rows"]}


def gather(results_dir: Path = RESULTS_DIR) -> dict:
    """The rows of every benchmark's latest results, and which are missing."""
    rows, written, missing = [], {}, []
    for name, what in SOURCES.items():
        path = results_dir / f"{name}.json"
        if not path.exists():
            missing.append(f"{what} ({name}): not run; `python -m bench {name}`")
            continue
        try:
            rows += [{"source": name, **r} for r in ROWS_OF[name](json.loads(path.read_text()))]
        except (ValueError, KeyError, TypeError):  # written by an older version of the benchmark
            missing.append(f"{what} ({name}): {path} is not this bench's; `python -m bench {name}`")
            continue
        written[name] = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return {"rows": rows, "written": written, "missing": missing}


def markdown(summary: dict) -> str:
    lines = [
        "# Bench summary",
        "",
        "Each figure against its peer measured in the same run (`python -m bench`); "
        "results written: " + ", ".join(f"{n} {t}" for n, t in summary["written"].items()) + ".",
        "",
        "| row | ours | peer | ratio | aim | mark | peer is |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        p50 = r.get("p50_ms") if r["unit"] == "ms" else None
        peer_p50 = r.get("peer_p50_ms") if r["unit"] == "ms" else None
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['row']} | {figure(r['ours'], r['unit'], p50)} | {figure(r['peer'], r['unit'], peer_p50)} "
            f"| {ratio} | {r['aim']} | {r['mark']} | {r['peer_name'] or '-'} |"
        )
    lines += ["", *(f"- missing: {m}" for m in summary["missing"])]
    return "\n".join(lines).rstrip() + "\n"


def run() -> None:
    summary = gather()
    print("\nSummary: every figure with an aim, against its peer from the same run")
    print_rows(summary["rows"])
    for missing in summary["missing"]:
        print(f"missing: {missing}")
    (RESULTS_DIR / "summary.md").write_text(markdown(summary))
    print(f"\nwrote {write_json('summary', summary)} and {RESULTS_DIR / 'summary.md'}")
