"""Export of a run's scalars as a table: one row per step, one column per series."""

from __future__ import annotations

import io
from typing import Any


def scalar_table(records: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) from decoded scalar records; later values of a step win."""
    by_step: dict[int, dict[str, float]] = {}
    wall: dict[int, float] = {}
    names: set[str] = set()
    for _, rec in records:
        row = by_step.setdefault(rec["step"], {})
        row.update(rec["s"])
        wall[rec["step"]] = rec["t"]
        names.update(rec["s"])
    columns = ["step", "wall_time", *sorted(names)]
    rows = [
        [step, wall[step], *(by_step[step].get(n) for n in columns[2:])] for step in sorted(by_step)
    ]
    return columns, rows


def to_csv(columns: list[str], rows: list[list[Any]]) -> str:
    """CSV text (empty cells for missing values)."""
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def to_parquet(columns: list[str], rows: list[list[Any]]) -> bytes:
    """Parquet bytes (needs pyarrow: ``pip install channelscope[export]``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [row[i] for row in rows] for i, c in enumerate(columns)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
