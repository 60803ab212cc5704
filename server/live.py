"""Live push: server-sent events of a run's streams, resumable with Last-Event-ID.

The generator reads Redis directly from the client's cursor (XREAD BLOCK), so each client
costs one small read buffer whatever its speed: a slow client never grows server memory.
Agent stream ids increase across all streams of a run, so one cursor (the SSE event id)
resumes every stream with no gap and no duplicate. A client whose cursor fell behind the
oldest entry still kept (streams are trimmed) gets a ``gap`` event first.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from monitor_agent import wire
from server.store import Store

BLOCK_MS = 1000
COUNT = 500
HEARTBEAT_S = 15.0


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _payload(kind: str, rec: dict[str, Any]) -> dict[str, Any]:
    rec = {k: v for k, v in rec.items() if k != "v"}
    return {"kind": kind, **rec}


def _json(obj: Any) -> str:
    return json.dumps(wire.json_safe(obj), allow_nan=False)


async def stream_run(
    request: Request, store: Store, run_id: str, cursor: str
) -> AsyncIterator[str]:
    """SSE frames (``id``, ``event``, ``data``) of every record after ``cursor``."""
    keys = {store.keys.stream(run_id, k): k for k in wire.STREAM_KINDS}
    # Are we behind the oldest entry still kept? Then say so before resuming.
    if cursor != "0-0":
        for key in keys:
            first: Any = await store.client.xrange(key, count=1)
            if first:
                first_id = first[0][0].decode()
                if _id_tuple(first_id) > _id_tuple(cursor):
                    gap = {"stream": keys[key], "resumed_at": first_id}
                    yield f"event: gap\ndata: {_json(gap)}\n\n"
    last_beat = asyncio.get_running_loop().time()
    while not await request.is_disconnected():
        reply: Any = await store.client.xread(
            dict.fromkeys(keys, cursor), count=COUNT, block=BLOCK_MS
        )
        batch: list[tuple[tuple[int, int], str, str, dict[str, Any]]] = []
        for key, entries in reply or []:
            kind = keys[key.decode() if isinstance(key, bytes) else key]
            for entry_id, rec in store.decode_entries(kind, entries):
                batch.append((_id_tuple(entry_id), entry_id, kind, rec))
        batch.sort()
        for _, entry_id, kind, rec in batch:
            yield f"id: {entry_id}\nevent: {kind}\ndata: {_json(_payload(kind, rec))}\n\n"
            cursor = entry_id
        if reply:
            newest = max(_id_tuple(e[-1][0].decode()) for _, e in reply if e)
            if newest > _id_tuple(cursor):
                cursor = f"{newest[0]}-{newest[1]}"
        now = asyncio.get_running_loop().time()
        if now - last_beat > HEARTBEAT_S:
            last_beat = now
            yield ": keep-alive\n\n"
