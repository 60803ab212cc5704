"""Long runs: reads come from multi-resolution rollups and survive raw-stream trimming."""

from __future__ import annotations

import math
import time

import httpx
import pytest
import redis

import monitor_agent as cs
from server.rollups import WIDTHS


def _wait_rolled(redis_client: redis.Redis, run: cs.Run, last_step: int) -> None:
    deadline = time.monotonic() + 30
    key = run.keys.run_state(run.id, "rollup:state")
    while time.monotonic() < deadline:
        got = redis_client.hget(key, "last_step")
        if got is not None and int(got) >= last_step:
            return
        time.sleep(0.1)
    raise AssertionError("rollups did not catch up")


def test_long_run_read_uses_rollups_with_exact_bucket_extremes(
    api: httpx.Client, redis_url: str, redis_client: redis.Redis
) -> None:
    n = 30_000
    values = [math.sin(s / 300) + (5.0 if s == 12_345 else 0.0) for s in range(n)]
    # a small MAXLEN: the raw stream forgets the early steps, the rollups keep them
    with cs.init("long", "run", redis_url=redis_url, maxlen=8_000) as run:
        for start in range(0, n, 1_500):
            for s in range(start, start + 1_500):
                run.log({"train/loss": values[s]}, s)
            run.flush()
            # the server folds each chunk before the stream trims it
            _wait_rolled(redis_client, run, start + 1_499)
    assert redis_client.xlen(run.keys.stream(run.id, "scalars")) < 12_000
    body = api.get(f"/api/runs/{run.id}/scalars", params={"max_points": 200}).json()
    assert body["source"] == "rollup"
    series = body["series"]["train/loss"]
    assert len(series["step"]) <= 200
    assert series["step"][0] < WIDTHS[2]  # history trimmed from the stream is still there
    assert series["step"][-1] == n - 1
    assert max(series["max"]) == pytest.approx(max(values))  # the spike survives
    # each rolled bucket's min/max equal the brute-force extremes of its steps
    width = next(w for w in WIDTHS if n / w <= 100)
    for step, lo, hi in zip(series["step"], series["min"], series["max"], strict=True):
        b = step // width
        chunk = values[b * width : min((b + 1) * width, n)]
        assert lo == pytest.approx(min(chunk))
        assert hi == pytest.approx(max(chunk))
    # incremental reads continue from the cursor on the raw stream
    again = api.get(f"/api/runs/{run.id}/scalars", params={"since": body["cursor"]}).json()
    assert again["series"] == {}


def test_retention_deletes_old_finished_runs(
    api: httpx.Client, redis_url: str, redis_client: redis.Redis
) -> None:
    import asyncio

    old = cs.init("short-lived", "old", redis_url=redis_url)
    old.log({"x": 1.0}, 0)
    old.finish()
    redis_client.zadd("cs:project:{short-lived}:runs", {old.id: time.time() - 10 * 86400})
    redis_client.hset("cs:project:{short-lived}:settings", "retention_days", 7)

    import redis.asyncio as aioredis

    from server.rollups import RollupWriter
    from server.store import Store

    async def apply() -> int:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await RollupWriter(Store(client, "cs:", 60.0), 0.1).apply_retention()
        finally:
            await client.aclose()

    assert asyncio.run(apply()) == 1
    assert api.get(f"/api/runs/{old.id}").status_code == 404


def test_a_write_racing_a_delete_leaves_no_keys(redis_url: str, redis_client: redis.Redis) -> None:
    import asyncio

    import redis.asyncio as aioredis

    from server.rollups import RollupWriter
    from server.store import Store

    run = cs.init("racy", "deleted", redis_url=redis_url)
    run.finish()
    records = [("5-0", {"step": 4, "t": 1.0, "s": {"train/loss": 0.5}})]

    async def delete_then_write() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            store = Store(client, "cs:", 60.0)
            await store.delete_run(run.id, "racy")
            # a rollup batch read before the delete is written after it
            await RollupWriter(store, 0.1)._write(run.id, records, "5-0")
        finally:
            await client.aclose()

    asyncio.run(delete_then_write())
    assert redis_client.keys(run.keys.run_state(run.id, "*")) == []


def test_two_replicas_folding_one_run_lose_no_update(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Buckets are merged by read-modify-write: two replicas folding different entries of
    one run into the same bucket at once must not lose either side's part."""
    import asyncio

    import msgpack
    import redis.asyncio as aioredis

    from server.rollups import RollupWriter, rollup_key
    from server.store import Store

    n = 6_000
    values = [math.cos(s / 97) for s in range(n)]
    run = cs.init("replicas", "two", redis_url=redis_url)
    for s in range(n):
        run.log({"train/loss": values[s]}, s)
    # Every record must be in Redis before the replicas fold (flush's 10 s default ran out
    # on a loaded machine and the fold saw 3,212 of 6,000).
    assert run.flush(120)

    async def fold_with_two() -> dict[int, list[tuple[int, list[float]]]]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            store = Store(client, "cs:", 60.0)
            a, b = RollupWriter(store, 0.05), RollupWriter(store, 0.05)
            while sum(await asyncio.gather(a.process_once(), b.process_once())):
                pass
            levels = {}
            for level in range(len(WIDTHS)):
                raw = await client.hgetall(rollup_key(store, run.id, level))
                levels[level] = [
                    (int(k.split(b"\x1f")[-1]), msgpack.unpackb(v)) for k, v in raw.items()
                ]
            return levels
        finally:
            await client.aclose()

    levels = asyncio.run(fold_with_two())
    run.finish()
    for level, buckets in levels.items():
        assert sum(int(v[3]) for _, v in buckets) == n  # every record counted once
        width = WIDTHS[level]
        for bucket, (lo, hi, _total, _count, _last, _lv) in buckets:
            chunk = values[bucket * width : (bucket + 1) * width]
            assert lo == pytest.approx(min(chunk)) and hi == pytest.approx(max(chunk))
