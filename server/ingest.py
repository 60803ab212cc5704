"""The ingest reader: tails every active run's streams and validates what arrives.

It is the server's one consumer of new records: it counts entries it must skip
(malformed, unknown schema, oversized) for ``/readyz`` and keeps the time it last
completed a pass, so a stuck reader is visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from monitor_agent import wire
from server.store import Store

log = logging.getLogger("channelscope.server")

PER_PASS = 2000
SPARK_POINTS = 40
# Scalars the runs list shows without reading streams.
LATEST = {"signal/occupancy": "occupancy", "memorization/score": "memorization_score"}


class Ingestor:
    """Background task that XREADs each active run's streams from where it left off."""

    def __init__(self, store: Store, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self.cursors: dict[str, dict[str, str]] = {}
        self.records = 0
        self.passes = 0
        self.last_pass_at = 0.0
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Start the reader on the running event loop."""
        self._task = asyncio.create_task(self._run(), name="channelscope-ingest")

    async def stop(self) -> None:
        """Cancel the reader and wait for it."""
        # The flag ends the loop at its next turn even when a Redis call swallows the
        # cancellation (redis-py has had such races); the app's shutdown then cannot
        # wait forever on a task that keeps running.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def alive(self) -> bool:
        """True when the reader task runs and finished a pass recently."""
        fresh = time.time() - self.last_pass_at < max(10.0, 20 * self.interval_s)
        return self._task is not None and not self._task.done() and fresh

    async def pass_once(self) -> int:
        """Read what arrived since the last pass; returns the number of entries read."""
        client: aioredis.Redis = self.store.client
        keys = self.store.keys
        total = 0
        for run_id in await self.store.active_runs():
            cursor_key = keys.run_state(run_id, "ingest")
            if run_id not in self.cursors:
                # Resume where any replica left off: a restart neither re-reads history
                # nor counts alerts twice.
                saved: Any = await client.hgetall(cursor_key)
                start = dict.fromkeys(wire.STREAM_KINDS, "0-0")
                start.update({k.decode(): v.decode() for k, v in saved.items()})
                self.cursors[run_id] = start
            cursors = self.cursors[run_id]
            streams: dict[Any, Any] = {
                keys.stream(run_id, k): cursors[k] for k in wire.STREAM_KINDS
            }
            reply: Any = await client.xread(streams, count=PER_PASS)
            if not reply:
                continue
            latest: dict[Any, Any] = {}
            spark: list[float] = []
            alerts = 0
            for key, entries in reply:
                kind = (key.decode() if isinstance(key, bytes) else key).rsplit(":", 1)[-1]
                for _, rec in self.store.decode_entries(kind, entries, count=True):
                    if kind == "scalars":
                        for name, short in LATEST.items():
                            if name in rec["s"]:
                                latest[short] = repr(rec["s"][name])
                                if short == "occupancy":
                                    spark.append(rec["s"][name])
                    elif kind == "events" and rec["kind"] in ("alert", "memorization_onset"):
                        alerts += 1
                last = entries[-1][0]
                cursors[kind] = last.decode() if isinstance(last, bytes) else last
                total += len(entries)
            latest_key = keys.run_state(run_id, "latest")
            pipe = client.pipeline(transaction=False)
            if latest:
                pipe.hset(latest_key, mapping=latest)
            if alerts:
                pipe.hincrby(latest_key, "alerts", alerts)
            if spark:
                spark_key = keys.run_state(run_id, "spark")
                pipe.rpush(spark_key, *[repr(v) for v in spark])
                pipe.ltrim(spark_key, -SPARK_POINTS, -1)
            pipe.hset(cursor_key, mapping=dict[Any, Any](cursors))
            await pipe.execute()
            await self.store.after_server_write(run_id)
        self.records += total
        return total

    async def _run(self) -> None:
        while not self._stopping:
            try:
                n = await self.pass_once()
                self.passes += 1
                self.last_pass_at = time.time()
                self.last_error = ""
                if n >= PER_PASS:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis may go away; the reader must outlive it
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("ingest pass failed: %s", self.last_error)
            await asyncio.sleep(self.interval_s)
