"""Read access to the Redis layout of DESIGN §2: runs, meta, and decoded stream ranges."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from monitor_agent import wire

_STREAM_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")
READ_CHUNK = 5000
ACTIVE_WINDOW_S = 7 * 24 * 3600


def valid_cursor(cursor: str) -> bool:
    """True when cursor is a Redis stream id (``ms`` or ``ms-seq``)."""
    return bool(_STREAM_ID.match(cursor))


@dataclass
class SkipCounter:
    """Counts stream entries that readers skipped, by reason and by stream kind."""

    by_reason: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, reason: str) -> None:
        """Count one skipped entry."""
        self.by_reason[reason] += 1
        self.by_kind[kind] += 1

    def total(self) -> int:
        """All skipped entries."""
        return sum(self.by_reason.values())


def _text(x: bytes | str | None) -> str:
    if x is None:
        return ""
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


def _id_pair(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _float(x: Any, default: float = 0.0) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


class Store:
    """Async reader of runs and their streams; one per server process."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        crashed_after_s: float,
        stalled_after_s: float = 300.0,
    ) -> None:
        self.client = client
        self.keys = wire.Keys(prefix)
        self.crashed_after_s = crashed_after_s
        self.stalled_after_s = stalled_after_s
        self.skipped = SkipCounter()

    def run_summary(self, run_id: str, meta: dict[str, Any]) -> dict[str, Any]:
        """The runs-list row of DESIGN §5.1 from a decoded meta hash."""
        status = meta.get("status") or "running"
        updated = _float(meta.get("updated_at"))
        last_record = _float(meta.get("last_record_at"), updated)
        now = time.time()
        if status == "running" and now - updated > self.crashed_after_s:
            status = "crashed"  # the agent's heartbeat stopped without a finish
        elif status == "running" and now - last_record > self.stalled_after_s:
            status = "stalled"  # alive, but no data for a while
        try:
            step = int(meta.get("step") or 0)
        except ValueError:
            step = 0
        return {
            "run_id": run_id,
            "project": meta.get("project", ""),
            "name": meta.get("name", ""),
            "status": status,
            "step": step,
            "started_at": _float(meta.get("started_at")),
            "updated_at": updated,
        }

    async def active_runs(self) -> list[str]:
        """Ids of the runs seen within ACTIVE_WINDOW_S: what the background readers follow."""
        members: Any = await self.client.zrangebyscore(
            self.keys.runs(), time.time() - ACTIVE_WINDOW_S, "+inf"
        )
        return [_text(x) for x in members]

    async def meta(self, run_id: str) -> dict[str, Any] | None:
        """Decoded meta hash of a run, or None when the run does not exist."""
        raw = await self.client.hgetall(self.keys.meta(run_id))
        return wire.decode_meta(raw) if raw else None

    async def list_runs(
        self, project: str | None, status: str | None, q: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Runs, most recently seen first, filtered by project, status and a text query."""
        key = self.keys.project_runs(project) if project else self.keys.runs()
        reply: list[Any] = await self.client.zrevrange(key, 0, -1)
        ids = [_text(x) for x in reply]
        pipe = self.client.pipeline(transaction=False)
        for run_id in ids:
            pipe.hgetall(self.keys.meta(run_id))
            pipe.hgetall(self.keys.run_state(run_id, "latest"))
            pipe.lrange(self.keys.run_state(run_id, "spark"), 0, -1)
        replies = await pipe.execute()
        out: list[dict[str, Any]] = []
        needle = (q or "").lower()
        for i, run_id in enumerate(ids):
            raw, latest, spark = replies[3 * i : 3 * i + 3]
            if not raw:
                continue
            row = self.run_summary(run_id, wire.decode_meta(raw))
            values = {_text(k): _float(v, float("nan")) for k, v in latest.items()}
            row["occupancy"] = wire.json_number(values.get("occupancy"))
            row["memorization_score"] = wire.json_number(values.get("memorization_score"))
            row["alerts"] = int(values.get("alerts", 0) or 0)
            row["occupancy_spark"] = [wire.json_number(_float(v, float("nan"))) for v in spark]
            if status and row["status"] != status:
                continue
            if needle and needle not in f"{run_id} {row['name']} {row['project']}".lower():
                continue
            out.append(row)
            if len(out) >= limit:
                break
        return out

    def decode_entries(
        self, kind: str, entries: Iterable[tuple[Any, Any]], count: bool = False
    ) -> list[tuple[str, dict[str, Any]]]:
        """Decode stream entries, skipping (and, when asked, counting) unusable ones."""
        out: list[tuple[str, dict[str, Any]]] = []
        for entry_id, fields in entries:
            try:
                out.append((_text(entry_id), wire.decode(kind, fields)))
            except wire.WireError as exc:
                if count:
                    self.skipped.add(kind, exc.reason)
        return out

    async def read(
        self, run_id: str, kind: str, since: str | None, limit: int | None = None
    ) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """Decoded entries after the cursor ``since`` (exclusive), and the new cursor.

        The cursor is the id of the last entry read, decodable or not, so a reader never
        sees an entry twice and never stalls on a bad one.
        """
        key = self.keys.stream(run_id, kind)
        start = f"({since}" if since else "-"
        records: list[tuple[str, dict[str, Any]]] = []
        cursor = since
        while True:
            chunk: Any = await self.client.xrange(key, min=start, max="+", count=READ_CHUNK)
            if not chunk:
                break
            records.extend(self.decode_entries(kind, chunk))
            cursor = _text(chunk[-1][0])
            start = f"({cursor}"
            if len(chunk) < READ_CHUNK or (limit is not None and len(records) >= limit):
                break
        return records, cursor

    async def read_spread(
        self, run_id: str, kind: str, since: str | None, budget: int
    ) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """At most ``budget`` entries after ``since``, evenly spaced in stream id (the
        agent's ids follow the step), and the cursor of the newest entry.

        A long run's per-layer vectors or histograms would otherwise all be read and
        decoded to keep a few hundred: here Redis seeks to each of ``budget`` evenly
        spaced ids (one pipelined XRANGE … COUNT 1 each), so the cost follows the budget,
        not the run's length."""
        key = self.keys.stream(run_id, kind)
        start = f"({since}" if since else "-"
        head: Any = await self.client.xrange(key, min=start, max="+", count=budget + 1)
        if len(head) <= budget:
            cursor = _text(head[-1][0]) if head else since
            return self.decode_entries(kind, head), cursor
        tail: Any = await self.client.xrevrange(key, max="+", min="-", count=1)
        first, last = _id_pair(_text(head[0][0])), _id_pair(_text(tail[0][0]))
        span = last[0] - first[0]
        pipe = self.client.pipeline(transaction=False)
        for i in range(budget):
            target = first[0] + (span * i) // max(budget - 1, 1)
            lower = _text(head[0][0]) if i == 0 else str(target)
            pipe.xrange(key, min=lower, max="+", count=1)
        picked: dict[str, Any] = {}
        for reply in await pipe.execute():
            for entry_id, fields in reply:
                picked.setdefault(_text(entry_id), fields)
        picked.setdefault(_text(tail[0][0]), tail[0][1])
        ordered = sorted(picked.items(), key=lambda kv: _id_pair(kv[0]))[-budget:]
        return self.decode_entries(kind, ordered), _text(tail[0][0])

    async def delete_run(self, run_id: str, project: str) -> None:
        """Delete every key of a run and its index entries."""
        keys = self.keys
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(keys.meta(run_id), *(keys.stream(run_id, k) for k in wire.STREAM_KINDS))
        pipe.zrem(keys.runs(), run_id)
        pipe.zrem(keys.project_runs(project), run_id)
        await pipe.execute()
        await self._delete_run_state(run_id)

    async def after_server_write(self, run_id: str) -> bool:
        """Call after writing server-owned keys of a run: if the run was deleted meanwhile
        (its meta is gone), remove what the write recreated, and return False. A background
        reader that was mid-batch when a run was deleted would otherwise leave keys behind."""
        if not await self.client.exists(self.keys.meta(run_id)):
            await self._delete_run_state(run_id)
            return False
        return True

    async def _delete_run_state(self, run_id: str) -> None:
        names = [
            _text(k) async for k in self.client.scan_iter(match=self.keys.run_state(run_id, "*"))
        ]
        if names:
            await self.client.delete(*names)
