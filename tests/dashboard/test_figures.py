from __future__ import annotations

import random

from dashboard import figures
from dashboard.run_page import _merge
from dashboard.runs_page import runs_table, sort_runs


def test_series_figure_keeps_trace_order_and_draws_empty_traces() -> None:
    names = ("a", "b", "c")
    steps = sorted(random.sample(range(1000), 20))
    values = [random.random() for _ in steps]
    fig = figures.series_figure("t", names, {"b": {"step": steps, "value": values}}, markers=True)
    assert [t.name for t in fig.data] == [*names, figures.MARKER_TRACE]
    assert list(fig.data[1].x) == steps
    assert list(fig.data[0].x) == []


def test_extend_payload_indexes_only_traces_with_new_points() -> None:
    payload = figures.extend_payload(
        ("a", "b", "c"),
        {"c": {"step": [5, 6], "value": [0.1, 0.2]}, "a": {"step": [], "value": []}},
    )
    assert payload == ({"x": [[5, 6]], "y": [[0.1, 0.2]]}, [2])
    assert figures.extend_payload(("a",), {}) is None


def test_markers_merge_with_series_updates() -> None:
    events = [
        {"kind": "memorization_onset", "step": 300, "message": "onset"},
        {"kind": "run_started", "step": 0, "message": "hi"},
    ]
    marks = figures.marker_payload(events, 3)
    assert marks == (
        {"x": [[300, 300, None]], "y": [[0, 1, None]], "text": [["onset", "onset", None]]},
        [3],
    )
    merged = _merge(({"x": [[1]], "y": [[2]]}, [0]), marks)
    assert merged is not None
    assert merged[1] == [0, 3]
    assert merged[0]["text"] == [[], ["onset", "onset", None]]


def test_spectrum_payload_counts_modes_above_the_cutoff() -> None:
    entries = [{"step": 10, "w_eigs": [0.4, 0.3, 0.1], "method": "exact"},
               {"step": 20, "w_eigs": [3.0, 0.5], "method": "sketch"}]  # fmt: skip
    data, idx = figures.spectrum_payload(entries, 2) or ({}, [])
    assert idx == [0, 1, 2]
    assert data["y"][2] == [2, 1]  # d_sig: > ¼ for exact, > 1 for the sketch
    assert data["x"][0] == [10, 20]


def test_heatmap_histogram_and_bars_render_without_data() -> None:
    assert figures.heatmap_figure([], "t", "z").data[0].y == (-1,)
    assert figures.histogram_figure(None, []).layout.annotations
    assert figures.spectrum_bars(None).layout.annotations
    entry = {"step": 5, "edges": [0.0, 1.0, 2.0], "counts": [[1, 3]]}
    fig = figures.histogram_figure(entry, ["only.weight", "extra"])
    assert list(fig.data[0].y) == ["#0"]  # names and rows disagree: numbered rows


def test_runs_sorting_and_table() -> None:
    runs = [
        {"run_id": "a", "project": "p", "name": "zeta", "status": "running", "step": 5,
         "updated_at": 1.0, "memorization_score": 0.9, "occupancy": 0.2, "alerts": 1},
        {"run_id": "b", "project": "p", "name": "alpha", "status": "finished", "step": 50,
         "updated_at": 2.0, "memorization_score": None, "occupancy": 0.7, "alerts": 0},
    ]  # fmt: skip
    assert [r["run_id"] for r in sort_runs(runs, "name")] == ["b", "a"]
    assert [r["run_id"] for r in sort_runs(runs, "memorization")] == ["a", "b"]
    assert [r["run_id"] for r in sort_runs(runs, "step")] == ["b", "a"]
    assert runs_table([]).className == "empty"
