"""Alert rules end to end: real Redis, real servers, a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import monitor_agent as cs
from server.embedded_redis import free_port
from server.settings import Settings
from tests.conftest import LiveServer


class Receiver:
    """A webhook receiver that records requests and can fail the first N of them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], Any]] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                outer.requests.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 15.0) -> list[tuple[dict[str, str], Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.requests) < n:
            time.sleep(0.05)
        return self.requests

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _server(redis_url: str, tmp_path: Path) -> LiveServer:
    settings = Settings(redis_url=redis_url, port=free_port(), home=tmp_path, poll_interval_s=0.05)
    return LiveServer(settings).start()


def test_rule_crud_and_validation(api: httpx.Client) -> None:
    assert api.get("/api/projects/p/rules").json() == {"rules": []}
    bad = api.post("/api/projects/p/rules", json={"kind": "threshold"})
    assert bad.status_code == 422
    assert api.post("/api/projects/p/rules", json={"kind": "nope"}).status_code == 422
    made = api.post(
        "/api/projects/p/rules", json={"kind": "threshold", "series": "train/loss", "value": 3}
    )
    assert made.status_code == 201
    rid = made.json()["id"]
    upd = api.put(
        f"/api/projects/p/rules/{rid}", json={"kind": "threshold", "series": "x", "value": 1}
    )
    assert upd.json()["series"] == "x"
    assert [r["id"] for r in api.get("/api/projects/p/rules").json()["rules"]] == [rid]
    assert api.delete(f"/api/projects/p/rules/{rid}").json() == {"deleted": rid}
    assert api.delete(f"/api/projects/p/rules/{rid}").status_code == 404
    assert api.get("/api/projects/bad{name}/rules").status_code in (404, 422)


def test_threshold_rule_fires_once_per_cooldown_and_is_an_event(
    redis_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    server = _server(redis_url, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as api:
            rule = {
                "kind": "threshold",
                "series": "train/loss",
                "op": "above",
                "value": 5.0,
                "for_points": 3,
                "webhook_url": receiver.url,
                "name": "loss blew up",
            }
            api.post("/api/projects/alerting/rules", json=rule).raise_for_status()
            run = cs.init("alerting", "boom", redis_url=redis_url)
            for step in range(40):
                run.log({"train/loss": 10.0 if 10 <= step < 12 or step >= 20 else 1.0}, step)
            run.finish()
            got = receiver.wait(1)
            time.sleep(1.0)  # anything extra would arrive by now
            assert len(got) == 1
            headers, body = got[0]
            assert body["run_id"] == run.id
            assert body["step"] == 22  # the third consecutive point above 5
            assert "X-Channelscope-Alert-Id" in headers
            alerts = api.get(f"/api/runs/{run.id}/alerts").json()["alerts"]
            assert len(alerts) == 1
            assert "loss blew up" in alerts[0]["message"]
    finally:
        server.stop()


def test_two_replicas_send_each_alert_exactly_once(
    redis_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    a, b = _server(redis_url, tmp_path / "a"), _server(redis_url, tmp_path / "b")
    try:
        with httpx.Client(base_url=a.url, timeout=10) as api:
            for series in ("m1", "m2", "m3"):
                rule = {
                    "kind": "threshold",
                    "series": series,
                    "value": 0.5,
                    "webhook_url": receiver.url,
                }
                api.post("/api/projects/dual/rules", json=rule).raise_for_status()
        runs = []
        for i in range(4):
            run = cs.init("dual", f"r{i}", redis_url=redis_url)
            for step in range(50):
                run.log({"m1": 1.0, "m2": float(step > 25), "m3": 0.0}, step)
            run.finish()
            runs.append(run)
        got = receiver.wait(8)
        time.sleep(1.5)
        keys = sorted((body["run_id"], body["rule"]["series"]) for _, body in got)
        assert keys == sorted((r.id, s) for r in runs for s in ("m1", "m2"))
    finally:
        a.stop()
        b.stop()


def test_webhook_retries_with_backoff_and_slack_format(redis_url: str, tmp_path: Path) -> None:
    flaky = Receiver(fail_first=2)
    server = _server(redis_url, tmp_path)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as api:
            rule = {
                "kind": "memorization_onset",
                "webhook_url": flaky.url,
                "webhook_format": "slack",
            }
            rid = api.post("/api/projects/mem/rules", json=rule).json()["id"]
            run = cs.init("mem", "memorizer", redis_url=redis_url)
            run.event("memorization_onset", "memorization onset at step 300", severity="warning",
                      step=300, data={"score": 0.8})  # fmt: skip
            run.finish()
            got = flaky.wait(1)
            assert len(got) == 1
            assert "memorization onset at step 300" in got[0][1]["text"]
            test = api.post(f"/api/projects/mem/rules/{rid}/test").json()
            assert test["delivered"] is True
    finally:
        server.stop()
        flaky.close()


def test_server_killed_mid_ingest_loses_no_alert_and_sends_none_twice(
    redis_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    first = _server(redis_url, tmp_path / "1")
    with httpx.Client(base_url=first.url, timeout=10) as api:
        rule = {"kind": "non_finite", "webhook_url": receiver.url, "cooldown_s": 3600}
        api.post("/api/projects/crash/rules", json=rule).raise_for_status()
    runs = [cs.init("crash", f"c{i}", redis_url=redis_url) for i in range(3)]
    for step in range(30):
        for run in runs:
            run.log({"train/loss": float("nan") if step == 15 else 1.0}, step)
    first.stop()  # may stop mid-evaluation; pending entries stay in the group
    for run in runs:
        run.finish()
    second = _server(redis_url, tmp_path / "2")
    try:
        second.app.state.alerts.claim_idle_ms = 100
        got = receiver.wait(3)
        time.sleep(1.5)
        assert sorted(body["run_id"] for _, body in got) == sorted(r.id for r in runs)
    finally:
        second.stop()
