"""A row of a benchmark's report: one figure of ours against its peer from the same run, and
the aim that judges it; printed as a table (bench.serve_speed) and gathered into the summary
(bench.summary)."""

from __future__ import annotations

from bench.common import print_table


def row(
    name: str,
    ours: float,
    peer: float | None,
    peer_name: str,
    unit: str,
    aim: str,
    ok: bool | None,
    **details,
) -> dict:
    """One row of the report: `ours` and `peer` are what the aim judges (a latency row's p99,
    with its p50s in the details); `ok` None: a figure reported without an aim."""
    return {
        "row": name,
        "ours": ours,
        "peer": peer,
        "peer_name": peer_name,
        "ratio": ours / peer if peer else None,
        "aim": aim,
        "mark": "info" if ok is None else ("pass" if ok else "MISS"),
        "unit": unit,
        **details,
    }


def figure(value: float | None, unit: str, p50: float | None = None) -> str:
    """A row's figure; a latency's p99 with its p50 before it ("p50 / p99 ms")."""
    if value is None:
        return "-"
    if unit == "samples/s":
        return f"{value:,.0f}/s"
    return f"{p50:,.2f} / {value:,.2f} {unit}" if p50 is not None else f"{value:,.2f} {unit}"


def print_rows(rows: list[dict]) -> None:
    print_table(
        ["row", "ours", "peer", "ratio", "aim", "mark", "peer is"],
        [
            [
                r["row"],
                figure(r["ours"], r["unit"], r.get("p50_ms") if r["unit"] == "ms" else None),
                figure(r["peer"], r["unit"], r.get("peer_p50_ms") if r["unit"] == "ms" else None),
                f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
                r["aim"],
                r["mark"],
                r["peer_name"] or "-",
            ]
            for r in rows
        ],
    )
