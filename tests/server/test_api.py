from __future__ import annotations

import itertools
import json
import math
import random
import time

import httpx
import msgpack
import pytest
import redis
import torch
from torch import nn

import monitor_agent as cs
from monitor_agent import wire


def _train_and_log(redis_url: str, steps: int) -> cs.Run:
    torch.manual_seed(random.randrange(10**6))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    with cs.init("itest", "mlp", config={"lr": 0.05}, redis_url=redis_url) as run:
        for step in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log({"train/loss": loss.item(), "train/spike": 100.0 if step == 77 else 0.0}, step)
    return run


def _wait_ready(api: httpx.Client, records: int) -> dict[str, object]:
    deadline = time.monotonic() + 10
    body: dict[str, object] = {}
    while time.monotonic() < deadline:
        body = api.get("/readyz").json()
        if isinstance(body["records_read"], int) and body["records_read"] >= records:
            return body
        time.sleep(0.05)
    return body


def test_training_loop_round_trip(api: httpx.Client, redis_url: str) -> None:
    run = _train_and_log(redis_url, 200)
    runs = api.get("/api/runs").json()["runs"]
    assert [r["run_id"] for r in runs] == [run.id]
    assert runs[0]["status"] == "finished"
    assert runs[0]["step"] == 199
    assert api.get("/api/runs", params={"project": "other"}).json()["runs"] == []
    assert api.get("/api/runs", params={"q": "mlp"}).json()["runs"][0]["run_id"] == run.id

    meta = api.get(f"/api/runs/{run.id}").json()
    assert meta["config"] == {"lr": 0.05}
    assert meta["project"] == "itest"

    full = api.get(f"/api/runs/{run.id}/scalars", params={"names": "train/loss"}).json()
    series = full["series"]["train/loss"]
    assert series["step"] == list(range(200))
    assert "min" not in series
    assert all(math.isfinite(v) for v in series["value"])

    down = api.get(f"/api/runs/{run.id}/scalars", params={"max_points": 50}).json()["series"]
    spike = down["train/spike"]
    assert len(spike["step"]) <= 50
    # brute force: each returned bucket's min and max equal those of the raw points in it
    raw = dict(zip(full["series"]["train/loss"]["step"], series["value"], strict=True))
    loss = down["train/loss"]
    prev = -1
    for step, lo, hi in zip(loss["step"], loss["min"], loss["max"], strict=True):
        bucket = [raw[s] for s in range(prev + 1, step + 1)]
        assert lo == min(bucket) and hi == max(bucket)
        prev = step
    assert max(spike["max"]) == 100.0  # the one-step spike survives downsampling


def test_since_returns_only_new_points(api: httpx.Client, redis_url: str) -> None:
    run = cs.init("itest", "since", redis_url=redis_url)
    for step in range(50):
        run.log({"train/loss": float(step)}, step)
    run.flush()
    first = api.get(f"/api/runs/{run.id}/scalars").json()
    assert first["series"]["train/loss"]["step"] == list(range(50))
    for step in range(50, 80):
        run.log({"train/loss": float(step)}, step)
    run.finish()
    second = api.get(f"/api/runs/{run.id}/scalars", params={"since": first["cursor"]}).json()
    assert second["series"]["train/loss"]["step"] == list(range(50, 80))
    third = api.get(f"/api/runs/{run.id}/scalars", params={"since": second["cursor"]}).json()
    assert third["series"] == {}
    assert third["cursor"] == second["cursor"]


def test_errors_are_json_and_name_the_parameter(api: httpx.Client, redis_url: str) -> None:
    missing = api.get("/api/runs/nosuchrun")
    assert missing.status_code == 404
    assert "nosuchrun" in missing.json()["detail"]
    assert api.get("/api/runs/bad{id}").status_code == 404
    assert api.get("/api/nothing-here").status_code == 404
    run = cs.init("itest", "q", redis_url=redis_url)
    run.log({"a": 1.0}, 0)
    run.finish()
    for params, name in (
        ({"max_points": "lots"}, "max_points"),
        ({"max_points": 1}, "max_points"),
        ({"since": "yesterday"}, "since"),
    ):
        resp = api.get(f"/api/runs/{run.id}/scalars", params=params)
        assert resp.status_code == 422
        assert any(name in err["loc"] for err in resp.json()["detail"])
    assert api.get("/api/runs", params={"status": "sleeping"}).status_code == 422


@pytest.mark.parametrize("bad", ["garbage", "future", "shape", "oversized"])
def test_bad_entries_are_skipped_counted_and_do_not_stop_the_reader(
    api: httpx.Client, redis_url: str, redis_client: redis.Redis, bad: str
) -> None:
    run = cs.init("itest", "bad", redis_url=redis_url)
    run.log({"train/loss": 1.0}, 0)
    run.flush()
    key = run.keys.stream(run.id, "scalars")
    payload = {
        "garbage": {b"d": b"\xc1\xc1\xc1"},
        "future": {b"d": msgpack.packb({"v": 99, "step": 1, "t": 0.0, "s": {}})},
        "shape": {b"d": msgpack.packb({"v": wire.SCHEMA_VERSION, "step": -3, "t": 0, "s": {}})},
        "oversized": {b"d": b"\x00" * (wire.MAX_RECORD_BYTES + 10)},
    }[bad]
    redis_client.xadd(key, payload)
    time.sleep(0.01)
    run.log({"train/loss": 2.0}, 2)
    run.finish()
    body = _wait_ready(api, 5)
    assert body["ready"] is True
    skipped = body["skipped"]
    assert isinstance(skipped, dict) and skipped["total"] == 1
    steps = api.get(f"/api/runs/{run.id}/scalars").json()["series"]["train/loss"]["step"]
    assert steps == [0, 2]


def test_openapi_and_docs_are_served(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    assert "/api/runs/{run_id}/scalars" in spec["paths"]
    assert api.get("/docs").status_code == 200
    assert api.get("/healthz").json() == {"status": "ok"}


def test_watched_run_serves_layers_histograms_and_spectrum(
    api: httpx.Client, redis_url: str
) -> None:
    torch.manual_seed(random.randrange(10**6))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(128, 8), torch.randint(0, 3, (128,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with cs.init("itest", "watched", redis_url=redis_url) as run:
        run.watch(
            model, opt, batch_size=16, dataset_size=128, noise="per_example", emit_every=5,
            hist_every=10, probe=(x[:16], y[:16]), spectrum_every=10, k=4, budget=None,
        )  # fmt: skip
        for step in range(31):
            idx = torch.randint(0, 128, (16,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.log({"train/loss": loss.item()}, step)
    meta = api.get(f"/api/runs/{run.id}").json()
    assert meta["layers"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert meta["settings"]["noise"] == "per_example"
    layers = api.get(f"/api/runs/{run.id}/layers", params={"names": "occupancy"}).json()
    occ = layers["series"]["occupancy"]
    assert occ["step"] == [0, 5, 10, 15, 20, 25, 30]
    assert all(len(v) == 4 and all(0 <= o <= 1 for o in v) for v in occ["value"])
    hist = api.get(f"/api/runs/{run.id}/hist").json()
    assert [e["step"] for e in hist["entries"]] == [0, 10, 20, 30]
    assert len(hist["entries"][0]["counts"]) == 4
    spectrum = api.get(f"/api/runs/{run.id}/spectrum").json()
    assert [e["step"] for e in spectrum["entries"]] == [10, 20, 30]
    assert spectrum["entries"][0]["method"] == "exact"
    scalars = api.get(
        f"/api/runs/{run.id}/scalars", params={"names": "spectrum/d_sig,signal/occupancy"}
    )
    series = scalars.json()["series"]
    assert series["spectrum/d_sig"]["step"] == [10, 20, 30]
    assert len(series["signal/occupancy"]["step"]) == 7
    again = api.get(f"/api/runs/{run.id}/spectrum", params={"since": spectrum["cursor"]}).json()
    assert again["entries"] == []


def test_export_csv_and_parquet(api: httpx.Client, redis_url: str) -> None:
    import io

    import pandas as pd

    run = cs.init("itest", "export", redis_url=redis_url)
    for step in range(20):
        run.log({"train/loss": 1.0 / (step + 1)}, step)
        if step % 5 == 0:
            run.log({"val/acc": step / 20}, step)
    run.finish()
    csv = api.get(f"/api/runs/{run.id}/export", params={"format": "csv"})
    assert csv.status_code == 200
    frame = pd.read_csv(io.StringIO(csv.text))
    assert list(frame["step"]) == list(range(20))
    assert frame["val/acc"].notna().sum() == 4
    parquet = api.get(f"/api/runs/{run.id}/export", params={"format": "parquet"})
    table = pd.read_parquet(io.BytesIO(parquet.content))
    assert table["train/loss"].iloc[3] == pytest.approx(0.25)
    assert api.get(f"/api/runs/{run.id}/export", params={"format": "xlsx"}).status_code == 422


def test_live_push_resumes_with_last_event_id(live_server: object, redis_url: str) -> None:
    from tests.conftest import LiveServer

    assert isinstance(live_server, LiveServer)
    run = cs.init("itest", "live", redis_url=redis_url)
    for step in range(30):
        run.log({"train/loss": float(step)}, step)
    run.flush()

    def read_events(headers: dict[str, str], n: int) -> list[tuple[str, str, str]]:
        got: list[tuple[str, str, str]] = []
        with httpx.stream(
            "GET", f"{live_server.url}/api/runs/{run.id}/live", headers=headers, timeout=10
        ) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            event_id = kind = ""
            for line in resp.iter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    got.append((event_id, kind, line[6:]))
                    if len(got) >= n:
                        break
        return got

    first = read_events({"Last-Event-ID": "0-0"}, 10)
    assert [k for _, k, _ in first].count("scalars") >= 9
    resumed = read_events({"Last-Event-ID": first[-1][0]}, 10)
    ids = [i for i, _, _ in first + resumed]
    assert len(ids) == len(set(ids))  # no duplicate across the reconnect
    steps = [json.loads(d)["step"] for _, k, d in first + resumed if k == "scalars"]
    assert steps == list(range(len(steps)))  # no gap
    run.finish()


def test_run_status_running_finished_crashed_stalled() -> None:
    import time as _time

    from server.store import Store

    store = Store(None, "cs:", crashed_after_s=60, stalled_after_s=300)  # type: ignore[arg-type]
    now = _time.time()

    def status(**meta: object) -> str:
        return str(store.run_summary("r", {"status": "running", **meta})["status"])

    assert status(updated_at=now, last_record_at=now) == "running"
    assert status(updated_at=now - 120, last_record_at=now - 120) == "crashed"
    assert status(updated_at=now, last_record_at=now - 600) == "stalled"
    assert store.run_summary("r", {"status": "finished", "updated_at": 0})["status"] == "finished"


def test_live_push_marks_a_gap_when_the_cursor_fell_behind_trimming(
    live_server: object, redis_url: str, redis_client: redis.Redis
) -> None:
    from tests.conftest import LiveServer

    assert isinstance(live_server, LiveServer)
    run = cs.init("itest", "gap", redis_url=redis_url)
    for step in range(50):
        run.log({"train/loss": float(step)}, step)
    run.flush()
    key = run.keys.stream(run.id, "scalars")
    old_cursor = redis_client.xrange(key, count=1)[0][0].decode()
    redis_client.xtrim(
        key, maxlen=10, approximate=False
    )  # the history behind the client's cursor is gone
    with httpx.stream("GET", f"{live_server.url}/api/runs/{run.id}/live",
                      headers={"Last-Event-ID": old_cursor}, timeout=10) as resp:  # fmt: skip
        first_event = next(line for line in resp.iter_lines() if line.startswith("event: "))
    assert first_event == "event: gap"
    run.finish()


def test_runs_list_carries_latest_occupancy_score_alerts_and_sparkline(
    api: httpx.Client, redis_url: str
) -> None:
    run = cs.init("itest", "latest", redis_url=redis_url)
    for step in range(30):
        run.log({"signal/occupancy": step / 100, "memorization/score": 0.5}, step)
    run.event("memorization_onset", "onset", severity="warning", step=20)
    run.finish()
    _wait_ready(api, 33)
    deadline = time.monotonic() + 10
    row: dict[str, object] = {}
    while time.monotonic() < deadline:
        row = api.get("/api/runs").json()["runs"][0]
        if row["occupancy"] is not None and row["alerts"]:
            break
        time.sleep(0.05)
    assert row["occupancy"] == pytest.approx(0.29)
    assert row["memorization_score"] == pytest.approx(0.5)
    assert row["alerts"] == 1
    spark = row["occupancy_spark"]
    assert isinstance(spark, list)
    assert spark[-1] == pytest.approx(0.29)


def test_long_vector_series_are_read_evenly_spaced_within_the_budget(
    api: httpx.Client, redis_url: str, redis_client: redis.Redis
) -> None:
    run = cs.init("itest", "spread", redis_url=redis_url)
    run.update_meta({"layers": ["a", "b"]})
    run.finish()
    pipe = redis_client.pipeline(transaction=False)
    steps = random.randrange(2000, 4000)
    for step in range(0, steps, 3):  # ids follow the step, with gaps
        rec = {"step": step, "t": 1.0 + step, "l": {"occupancy": [step / steps, 0.5]}}
        pipe.xadd(run.keys.stream(run.id, "layers"), wire.encode("layers", rec), id=f"{step + 1}-0")
        hrec = {"step": step, "t": 1.0 + step, "edges": [0.0, 1.0], "counts": [[step], [1]]}
        pipe.xadd(run.keys.stream(run.id, "hist"), wire.encode("hist", hrec), id=f"{step + 1}-0")
    pipe.execute()
    last = 3 * ((steps - 1) // 3)
    body = api.get(f"/api/runs/{run.id}/layers", params={"max_points": 50}).json()
    got = body["series"]["occupancy"]["step"]
    assert 40 <= len(got) <= 50 and got == sorted(set(got))
    assert got[0] == 0 and got[-1] == last and body["cursor"] == f"{last + 1}-0"
    gaps = [b - a for a, b in itertools.pairwise(got)]
    assert max(gaps) <= 2 * (last / 49) + 3  # evenly spread, not the first 50
    assert (
        api.get(f"/api/runs/{run.id}/layers", params={"since": body["cursor"]}).json()["series"]
        == {}
    )
    hist = api.get(f"/api/runs/{run.id}/hist").json()  # default budget: 200 entries
    assert len(hist["entries"]) <= 200 and hist["entries"][-1]["step"] == last
    # A cursor inside the run: only entries after it, still within the budget
    mid = f"{3 * (steps // 6) + 1}-0"
    tail = api.get(f"/api/runs/{run.id}/hist", params={"since": mid, "max_points": 20}).json()
    tail_steps = [e["step"] for e in tail["entries"]]
    assert len(tail_steps) <= 20 and tail_steps[0] > 3 * (steps // 6) and tail_steps[-1] == last
