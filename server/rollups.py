"""Multi-resolution rollups of scalar series, so long runs stay readable.

For each run and each level ℓ (bucket widths 10, 100, … 100 000 steps) the HASH
``<prefix>run:{id}:rollup:ℓ`` maps ``name<US>bucket`` to msgpack
[min, max, sum, count, last_step, last_value] of the finite values in that bucket.
The server's replicas fill them through one Redis consumer group on each run's scalars
stream, so each record is folded in once. A read that needs downsampling takes the
coarsest-but-sufficient level for the rolled-up part and the raw stream only for the
tail not rolled up yet: O(max_points) hash fields plus the tail, whatever the run's
length, and history trimmed from the raw stream (MAXLEN) survives in the rollups.

Retention: a project's ``retention_days`` (HASH ``<prefix>project:{p}:settings``) makes the
writer delete that project's finished runs older than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import socket
import time
from typing import Any

import msgpack
import redis.asyncio as aioredis

from monitor_agent import wire
from server.store import Store

log = logging.getLogger("channelscope.rollups")

WIDTHS = (10, 100, 1_000, 10_000, 100_000)
GROUP = "cs-rollup"
SEP = "\x1f"
RETENTION_EVERY_S = 60.0
# A replica folds a run only while it holds the run's lease: buckets are merged by
# read-modify-write, and two replicas folding different entries of one run into the same
# bucket lost one side's update. A crashed holder's lease lapses after this long.
LEASE_MS = 10_000


def rollup_key(store: Store, run_id: str, level: int) -> str:
    """The HASH of one rollup level of a run."""
    return store.keys.rollup(run_id, level)


def state_key(store: Store, run_id: str) -> str:
    """The HASH with the id and step the rollups have reached, and the series names."""
    return store.keys.run_state(run_id, "rollup:state")


def _merge(a: list[float] | None, b: list[float]) -> list[float]:
    if a is None:
        return b
    lo, hi, total, count, last_step, last_value = a
    b_lo, b_hi, b_total, b_count, b_step, b_value = b
    if b_step >= last_step:
        last_step, last_value = b_step, b_value
    return [min(lo, b_lo), max(hi, b_hi), total + b_total, count + b_count, last_step, last_value]


def fold(records: list[tuple[str, dict[str, Any]]]) -> dict[tuple[int, str], list[float]]:
    """Bucket statistics of a batch of scalar records, per (level, field)."""
    acc: dict[tuple[int, str], list[float]] = {}
    for _, rec in records:
        step = rec["step"]
        for name, value in rec["s"].items():
            if value is None or not math.isfinite(value):
                continue
            stats = [value, value, value, 1, step, value]
            for level, width in enumerate(WIDTHS):
                key = (level, f"{name}{SEP}{step // width}")
                acc[key] = _merge(acc.get(key), stats)
    return acc


class RollupWriter:
    """Folds new scalar records into the rollups (and applies retention)."""

    def __init__(self, store: Store, interval_s: float, claim_idle_ms: int = 30_000) -> None:
        self.store = store
        self.interval_s = interval_s
        self.claim_idle_ms = claim_idle_ms
        self.consumer = f"{socket.gethostname()}-{secrets.token_hex(3)}"
        self.folded = 0
        self._groups: set[str] = set()
        self._last_retention = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Start the writer loop."""
        self._task = asyncio.create_task(self._loop(), name="cs-rollups")

    async def stop(self) -> None:
        """Stop the writer loop."""
        # The flag, as in Ingestor.stop: a swallowed cancellation must not keep it running.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                n = await self.process_once()
                if time.time() - self._last_retention > RETENTION_EVERY_S:
                    self._last_retention = time.time()
                    await self.apply_retention()
                if n:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis may go away; the loop must outlive it
                log.warning("rollup pass failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.interval_s)

    async def _group(self, key: str) -> None:
        if key in self._groups:
            return
        try:
            await self.store.client.xgroup_create(key, GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(key)

    async def process_once(self) -> int:
        """Fold what arrived on every active run; returns the records folded."""
        client, keys = self.store.client, self.store.keys
        total = 0
        for run_id in await self.store.active_runs():
            if not await self._lease(run_id):
                continue
            key = keys.stream(run_id, "scalars")
            await self._group(key)
            claimed: Any = await client.xautoclaim(
                key,
                GROUP,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id="0-0",
                count=2000,
            )
            entries = list(claimed[1]) if claimed else []
            fresh: Any = await client.xreadgroup(GROUP, self.consumer, {key: ">"}, count=2000)
            for _, items in fresh or []:
                entries.extend(items)
            if not entries:
                continue
            records = self.store.decode_entries("scalars", entries)
            await self._write(run_id, records, entries[-1][0])
            await client.xack(key, GROUP, *[e[0] for e in entries])
            total += len(entries)
        self.folded += total
        return total

    async def _lease(self, run_id: str) -> bool:
        """Take or renew this replica's lease on folding a run; False when another holds it."""
        client = self.store.client
        lease = self.store.keys.run_state(run_id, "rollup:lease")
        holder = await client.get(lease)
        if holder in (self.consumer, self.consumer.encode()):
            await client.pexpire(lease, LEASE_MS)
            return True
        if holder is None and await client.set(lease, self.consumer, nx=True, px=LEASE_MS):
            # The lease is a server-owned key too: a run deleted meanwhile keeps none.
            return await self.store.after_server_write(run_id)
        return False

    async def _write(
        self, run_id: str, records: list[tuple[str, dict[str, Any]]], last_id: Any
    ) -> None:
        client = self.store.client
        acc = fold(records)
        by_level: dict[int, list[str]] = {}
        for level, field in acc:
            by_level.setdefault(level, []).append(field)
        pipe = client.pipeline(transaction=False)
        for level, fields in by_level.items():
            pipe.hmget(rollup_key(self.store, run_id, level), fields)
        existing = await pipe.execute()
        pipe = client.pipeline(transaction=False)
        for (level, fields), old in zip(by_level.items(), existing, strict=True):
            mapping: dict[str | bytes, bytes] = {}
            for field, packed in zip(fields, old, strict=True):
                prev = msgpack.unpackb(packed) if packed else None
                mapping[field] = msgpack.packb(_merge(prev, acc[(level, field)]))
            pipe.hset(rollup_key(self.store, run_id, level), mapping=mapping)  # type: ignore[arg-type]
        names = {name for _, rec in records for name in rec["s"]}
        last_step = max((rec["step"] for _, rec in records), default=0)
        state = state_key(self.store, run_id)
        pipe.hset(state, mapping={"last_id": last_id})
        pipe.hsetnx(state, "first_step", min((rec["step"] for _, rec in records), default=0))
        if names:
            pipe.sadd(f"{state}:names", *names)
        await pipe.execute()
        prev_last = await client.hget(state, "last_step")
        if prev_last is None or int(prev_last) < last_step:
            await client.hset(state, "last_step", last_step)
        await self.store.after_server_write(run_id)

    async def apply_retention(self) -> int:
        """Delete finished runs older than their project's retention; returns how many."""
        client, keys = self.store.client, self.store.keys
        projects: Any = await client.smembers(keys.projects())
        deleted = 0
        for raw in projects:
            project = raw.decode() if isinstance(raw, bytes) else raw
            days = await client.hget(
                f"{keys.prefix}project:{{{project}}}:settings", "retention_days"
            )
            if days is None:
                continue
            horizon = time.time() - float(days) * 86400
            old: Any = await client.zrangebyscore(keys.project_runs(project), "-inf", horizon)
            for r in old:
                run_id = r.decode() if isinstance(r, bytes) else r
                meta = await self.store.meta(run_id)
                if meta is not None and meta.get("status") in ("finished", "crashed"):
                    await self.store.delete_run(run_id, project)
                    deleted += 1
        return deleted


async def read_rolled(
    store: Store, run_id: str, names: set[str] | None, max_points: int
) -> tuple[dict[str, dict[str, list[Any]]], str | None] | None:
    """Series from the rollups (up to where they reached) and the raw tail after them;
    None when the run has no rollups yet."""
    client = store.client
    state: Any = await client.hgetall(state_key(store, run_id))
    if not state or b"last_id" not in state:
        return None
    first = int(state.get(b"first_step", b"0"))
    last = int(state.get(b"last_step", b"0"))
    rolled_id = state[b"last_id"].decode()
    all_names: Any = await client.smembers(f"{state_key(store, run_id)}:names")
    series_names = sorted(n.decode() for n in all_names)
    if names is not None:
        series_names = [n for n in series_names if n in names]
    # Half the budget for the rolled-up range, half for the raw tail.
    budget = max(max_points // 2, 1)
    span = last - first + 1
    level = next((i for i, w in enumerate(WIDTHS) if span / w <= budget), len(WIDTHS) - 1)
    width = WIDTHS[level]
    buckets = list(range(first // width, last // width + 1))
    pipe = client.pipeline(transaction=False)
    for name in series_names:
        pipe.hmget(rollup_key(store, run_id, level), [f"{name}{SEP}{b}" for b in buckets])
    replies = await pipe.execute()
    out: dict[str, dict[str, list[Any]]] = {}
    for name, packed in zip(series_names, replies, strict=True):
        s: dict[str, list[Any]] = {"step": [], "value": [], "min": [], "max": []}
        for item in packed:
            if not item:
                continue
            lo, hi, total, count, last_step, _ = msgpack.unpackb(item)
            s["step"].append(int(last_step))
            s["value"].append(wire.json_number(total / count))
            s["min"].append(wire.json_number(lo))
            s["max"].append(wire.json_number(hi))
        out[name] = s
    # The tail the rollups have not reached, downsampled into the other half.
    from server.downsample import downsample

    tail, cursor = await store.read(run_id, "scalars", rolled_id)
    points: dict[str, list[tuple[int, float | None]]] = {}
    for _, rec in tail:
        for name, value in rec["s"].items():
            if names is None or name in names:
                points.setdefault(name, []).append((rec["step"], wire.json_number(value)))
    for name, pts in points.items():
        pts.sort(key=lambda p: p[0])
        d = downsample([p[0] for p in pts], [p[1] for p in pts], budget)
        s = out.setdefault(name, {"step": [], "value": [], "min": [], "max": []})
        s["step"] += d.step
        s["value"] += d.value
        s["min"] += d.min if d.min is not None else d.value
        s["max"] += d.max if d.max is not None else d.value
    return out, cursor or rolled_id
