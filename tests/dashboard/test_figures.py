from __future__ import annotations

import random

from dashboard import figures


def test_series_figure_keeps_trace_order_and_draws_empty_traces() -> None:
    names = ("a", "b", "c")
    steps = sorted(random.sample(range(1000), 20))
    values = [random.random() for _ in steps]
    fig = figures.series_figure("t", names, {"b": {"step": steps, "value": values}})
    assert [t.name for t in fig.data] == list(names)
    assert list(fig.data[1].x) == steps
    assert list(fig.data[0].x) == []


def test_extend_payload_indexes_only_traces_with_new_points() -> None:
    payload = figures.extend_payload(
        ("a", "b", "c"),
        {"c": {"step": [5, 6], "value": [0.1, 0.2]}, "a": {"step": [], "value": []}},
    )
    assert payload == ({"x": [[5, 6]], "y": [[0.1, 0.2]]}, [2])
    assert figures.extend_payload(("a",), {}) is None
