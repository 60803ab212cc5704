from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import redis

import monitor_agent as cs
from monitor_agent import wire
from server.embedded_redis import EmbeddedRedis, free_port


def _steps(client: redis.Redis, run: cs.Run) -> list[int]:
    entries = client.xrange(run.keys.stream(run.id, "scalars"))
    return [wire.decode("scalars", fields)["step"] for _, fields in entries]


def test_log_reaches_redis_in_order(redis_client: redis.Redis, redis_url: str) -> None:
    with cs.init("unit", "order", config={"lr": 0.1}, redis_url=redis_url) as run:
        for step in range(500):
            run.log({"train/loss": 1.0 / (step + 1)}, step=step)
    assert _steps(redis_client, run) == list(range(500))
    meta = wire.decode_meta(redis_client.hgetall(run.keys.meta(run.id)))
    assert meta["status"] == "finished"
    assert meta["config"] == {"lr": 0.1}
    assert redis_client.zscore(run.keys.runs(), run.id) is not None
    # the sender thread accounts for its CPU time (agent/overhead includes it)
    assert 0 < run.sender_stats()["cpu_s"] < time.process_time()


def test_unreachable_redis_never_blocks_and_spools(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    run = cs.init("unit", "offline", redis_url=dead)
    t0 = time.perf_counter()
    for step in range(2000):
        run.log({"train/loss": float(step)}, step=step)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0  # generous: 2000 non-blocking calls, not a benchmark
    run.finish(timeout=10)
    stats = run.sender_stats()
    assert stats["spooled"] > 0
    assert stats["sent"] == 0
    assert run._sender is not None and run._sender.spool.pending()


def test_redis_killed_mid_run_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    import httpx

    from server.settings import Settings
    from tests.conftest import LiveServer

    port = free_port()
    server = EmbeddedRedis(tmp_path / "r", port=port).start()
    run = cs.init("unit", "restart", redis_url=server.url)
    blocked = 0.0
    for step in range(2000):
        t0 = time.perf_counter()
        run.log({"train/loss": float(step)}, step=step)
        blocked = max(blocked, time.perf_counter() - t0)
        if step == 600:
            server.kill()  # SIGKILL: no shutdown, no final flush
        if step == 1400:
            server = EmbeddedRedis(tmp_path / "r", port=port).start()
        time.sleep(0.001)
    run.finish(timeout=30)
    assert blocked < 0.5  # no log call waited on Redis (generous: not a benchmark)
    api = LiveServer(Settings(redis_url=server.url, port=free_port(), home=tmp_path)).start()
    try:
        body = httpx.get(f"{api.url}/api/runs/{run.id}/scalars", params={"max_points": 5000}).json()
        assert body["series"]["train/loss"]["step"] == list(range(2000))
        assert run.sender_stats()["spooled"] > 0
    finally:
        api.stop()
        server.stop()


def test_non_numbers_are_dropped_with_a_warning_and_nan_raises_an_event(
    redis_client: redis.Redis, redis_url: str
) -> None:
    import pytest

    with cs.init("unit", "bad", redis_url=redis_url) as run:
        with pytest.warns(UserWarning, match="not a number"):
            run.log({"train/loss": float("nan"), "note": "hello"}, step=0)
        run.log({"train/loss": float("nan")}, step=1)
    events = [
        wire.decode("events", f) for _, f in redis_client.xrange(run.keys.stream(run.id, "events"))
    ]
    non_finite = [e for e in events if e["kind"] == "non_finite"]
    assert len(non_finite) == 1
    assert non_finite[0]["data"]["name"] == "train/loss"
    assert _steps(redis_client, run) == [0, 1]


def test_disabled_mode_sends_nothing(redis_client: redis.Redis, redis_url: str) -> None:
    run = cs.init("unit", "off", redis_url=redis_url, mode="disabled")
    run.log({"x": 1.0}, step=0)
    run.finish()
    assert redis_client.dbsize() == 0


def test_offline_spool_syncs_later_without_duplicates_and_a_run_resumes(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    import subprocess
    import sys

    run = cs.init("unit", "offline-sync", mode="offline")
    for step in range(100):
        run.log({"train/loss": float(step)}, step=step)
    run.finish()
    assert run._sender is not None
    spool = run._sender.spool.path
    assert spool.exists()
    env = {"CHANNELSCOPE_REDIS_URL": redis_url, "PATH": ""}
    for _ in range(2):  # a second sync of the same file changes nothing
        copy = tmp_path / spool.name
        copy.write_bytes(spool.read_bytes())
        out = subprocess.run([sys.executable, "-m", "server.cli", "sync", str(copy)],
                             env=env, capture_output=True, text=True, check=True)  # fmt: skip
        assert "ops sent" in out.stdout
        assert not copy.exists()
    assert _steps(redis_client, run) == list(range(100))
    # a crashed run resumes under the same id and keeps appending
    resumed = cs.init("unit", "offline-sync", redis_url=redis_url, run_id=run.id, resume=True)
    for step in range(100, 120):
        resumed.log({"train/loss": float(step)}, step=step)
    resumed.finish()
    assert _steps(redis_client, run) == list(range(120))
    meta = wire.decode_meta(redis_client.hgetall(run.keys.meta(run.id)))
    assert meta["status"] == "finished"
    assert "resumed_at" in meta


def test_log_accepts_any_integer_step_and_rejects_the_rest() -> None:
    import numpy as np
    import pytest
    import torch

    run = cs.init("unit", "steps", mode="disabled")
    run.log({"a": 1.0}, step=np.int64(3))
    run.log({"a": 1.0}, step=torch.tensor(7))
    assert run.step == 7
    for bad in (1.5, True, -1, "x"):
        with pytest.raises(ValueError, match="non-negative integer"):
            run.log({"a": 1.0}, step=bad)  # type: ignore[arg-type]
    run.finish()


def test_records_of_a_busy_moment_go_out_in_one_delivery(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """The sender waits briefly for more records, so a run emitting every step pays one
    delivery (touch ops, a pipeline round trip) per batch, not per record."""
    from monitor_agent.sender import Sender

    deliveries = []

    def touch(with_records: bool) -> list[tuple[str, str, object]]:
        if with_records:
            deliveries.append(time.monotonic())
        return []

    sender = Sender(lambda: redis_url, tmp_path / "s.spool", on_batch=touch, linger_s=1.0)
    key = "cs:test:linger"
    for i in range(10):  # one record every 5 ms, as a fast training loop emits them
        sender.submit([("xadd", key, (f"{i + 1}-0", {b"d": b"x"}, 1000))])
        time.sleep(0.005)
    assert sender.flush(5.0)
    sender.close()
    assert len(deliveries) == 1
    assert redis_client.xlen(key) == 10


def test_emit_many_queues_records_together_and_a_bad_one_loses_only_itself(
    redis_client: redis.Redis, redis_url: str
) -> None:
    with cs.init("unit", "many", redis_url=redis_url) as run:
        layers = {"step": 3, "t": 1.0, "l": {"occupancy": [0.25, 0.5]}}
        scalars = {"step": 3, "t": 1.0, "s": {"signal/occupancy": 0.4}}
        run.emit_many([("layers", layers), ("scalars", scalars)], check=False)
        with pytest.warns(UserWarning, match="hist record not sent"):
            run.emit_many([("hist", {"step": "x"}), ("scalars", {**scalars, "step": 4})])
        # Unchecked, a record is encoded when handed to the sender (here by flush): a value
        # msgpack cannot pack is dropped with a warning, never raised, and the records
        # held with it still go.
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run.emit_many([("scalars", {**scalars, "s": {"x": object()}})], check=False)
            run.emit_many([("scalars", {**scalars, "step": 5})], check=False)
            run.flush()
        assert [str(w.message)[:37] for w in seen] == ["channelscope: scalars record not sent"]
        assert seen[0].filename == __file__
        # Nor does an event whose data passes the checks but cannot be packed raise.
        with pytest.warns(UserWarning, match="events record not sent") as caught:
            run.event("note", "data msgpack cannot pack", data={"x": object()})
        assert caught[0].filename == __file__  # the warning points at the caller's line
    assert _steps(redis_client, run) == [3, 4, 5]
    entries = redis_client.xrange(run.keys.stream(run.id, "layers"))
    assert [wire.decode("layers", f)["l"] for _, f in entries] == [{"occupancy": [0.25, 0.5]}]


def test_records_logged_fast_are_held_and_handed_off_together(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Records that come within HOLD_S of the last hand-off wait in the run and reach the
    sender's queue as one batch: encoding a record right after a training step costs
    several times what it costs in a burst."""
    from monitor_agent.run import HOLD_S

    with cs.init("unit", "hold", redis_url=redis_url) as run:
        assert run._sender is not None
        run.flush()  # hand-off now: the next records come within HOLD_S of it
        queued = run._sender._queue.unfinished_tasks
        for step in range(5):
            run.log({"train/loss": float(step)}, step=step)
        assert run._sender._queue.unfinished_tasks <= queued + 1  # at most one batch
        time.sleep(HOLD_S)
        run.log({"train/loss": 5.0}, step=5)  # HOLD_S later: everything held goes now
        assert not run._held
    assert _steps(redis_client, run) == list(range(6))


def test_records_held_when_logging_stops_go_out_on_the_senders_idle_turn(
    redis_client: redis.Redis, redis_url: str
) -> None:
    run = cs.init("unit", "idle", redis_url=redis_url)
    run.flush()
    run.log({"train/loss": 1.0}, step=0)
    run.log({"train/loss": 2.0}, step=1)
    deadline = time.monotonic() + 5.0
    while len(_steps(redis_client, run)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # No flush, no finish: the sender's idle wake-up (every 0.2 s) handed them off.
    assert _steps(redis_client, run) == [0, 1]
    run.finish()


def test_threads_logging_at_once_lose_and_duplicate_nothing(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Entry ids are drawn and queued in one critical section: a stream's ids reach Redis
    in increasing order whichever thread logs, so Redis rejects none of them."""
    import threading

    with cs.init("unit", "threads", redis_url=redis_url) as run:

        def worker(k: int) -> None:
            for step in range(300):
                run.log({f"w{k}": float(step)}, step=step)
                run.emit_many([("layers", {"step": step, "t": 1.0, "l": {"x": [k]}})], check=False)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    stats = run.sender_stats()
    assert stats["duplicates"] == 0 and stats["errors"] == 0 and stats["dropped"] == 0
    assert redis_client.xlen(run.keys.stream(run.id, "scalars")) == 1200
    assert redis_client.xlen(run.keys.stream(run.id, "layers")) == 1200
    per_worker: dict[str, list[float]] = {}
    for _, fields in redis_client.xrange(run.keys.stream(run.id, "scalars")):
        for name, value in wire.decode("scalars", fields)["s"].items():
            per_worker.setdefault(name, []).append(value)
    # Each thread's records arrive in the order it logged them.
    assert all(v == [float(s) for s in range(300)] for v in per_worker.values())
    assert len(per_worker) == 4
