"""The HTTP contract of DESIGN §5.1: runs, meta, series, spectra, events, health."""

from __future__ import annotations

import math
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from monitor_agent import wire
from server.downsample import downsample
from server.ingest import Ingestor
from server.store import Store, valid_cursor

router = APIRouter()

Since = Annotated[
    str | None,
    Query(description="stream cursor from a previous response; only newer entries are returned"),
]
MaxPoints = Annotated[int | None, Query(ge=2, le=100_000, description="point budget per series")]
Names = Annotated[str | None, Query(description="comma-separated series names; all when absent")]


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _check_since(since: str | None) -> None:
    if since is not None and not valid_cursor(since):
        raise HTTPException(
            status_code=422,
            detail=[
                {
                    "loc": ["query", "since"],
                    "msg": "since must be a stream cursor like '1700000000000-0'",
                    "type": "value_error",
                }
            ],
        )


async def _require_meta(store: Store, run_id: str) -> dict[str, Any]:
    meta = await store.meta(run_id) if wire.valid_run_id(run_id) else None
    if meta is None:
        raise HTTPException(status_code=404, detail=f"run {run_id!r} not found")
    return meta


def _names(names: str | None) -> set[str] | None:
    if not names:
        return None
    return {n.strip() for n in names.split(",") if n.strip()}


def _clean(x: Any) -> float | None:
    if x is None:
        return None
    try:
        return wire.json_number(float(x))
    except (TypeError, ValueError):
        return None


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> JSONResponse:
    """Readiness: Redis reachable, ingest reader alive, and counts of skipped records."""
    store = _store(request)
    ingestor: Ingestor = request.app.state.ingestor
    try:
        redis_ok = bool(await store.client.ping())
    except (aioredis.RedisError, OSError):
        redis_ok = False
    body = {
        "ready": redis_ok and ingestor.alive(),
        "redis": redis_ok,
        "reader_alive": ingestor.alive(),
        "reader_error": ingestor.last_error,
        "records_read": ingestor.records,
        "skipped": {
            "total": store.skipped.total(),
            "by_reason": dict(store.skipped.by_reason),
            "by_kind": dict(store.skipped.by_kind),
        },
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/api/runs", tags=["runs"])
async def list_runs(
    request: Request,
    project: str | None = None,
    status: Annotated[str | None, Query(pattern="^(running|finished|crashed|stalled)$")] = None,
    q: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> dict[str, Any]:
    """Runs, most recently seen first."""
    if project is not None and not wire.valid_project(project):
        raise HTTPException(status_code=422, detail="project: invalid project name")
    return {"runs": await _store(request).list_runs(project, status, q, limit)}


@router.get("/api/runs/{run_id}", tags=["runs"])
async def run_meta(request: Request, run_id: str) -> dict[str, Any]:
    """Run metadata: summary plus config, layer names in order, and agent settings."""
    store = _store(request)
    meta = await _require_meta(store, run_id)
    row = store.run_summary(run_id, meta)
    row.update(
        config=meta.get("config") or {},
        layers=meta.get("layers") or [],
        settings=meta.get("settings") or {},
        tags=meta.get("tags") or [],
        host=meta.get("host", ""),
        schema_version=meta.get("schema_version", ""),
    )
    return row


@router.get("/api/runs/{run_id}/scalars", tags=["series"])
async def scalars(
    request: Request,
    run_id: str,
    names: Names = None,
    since: Since = None,
    max_points: MaxPoints = None,
) -> dict[str, Any]:
    """Scalar series after ``since``, each downsampled to ``max_points`` keeping min/max."""
    _check_since(since)
    store = _store(request)
    await _require_meta(store, run_id)
    wanted = _names(names)
    records, cursor = await store.read(run_id, "scalars", since)
    points: dict[str, list[tuple[int, float | None]]] = {}
    for _, rec in records:
        for name, value in rec["s"].items():
            if wanted is None or name in wanted:
                points.setdefault(name, []).append((rec["step"], _clean(value)))
    budget = max_points or request.app.state.settings.default_max_points
    series: dict[str, Any] = {}
    for name, pts in sorted(points.items()):
        pts.sort(key=lambda p: p[0])
        series[name] = downsample([p[0] for p in pts], [p[1] for p in pts], budget).as_json()
    return {"series": series, "cursor": cursor}


@router.get("/api/runs/{run_id}/layers", tags=["series"])
async def layers(
    request: Request,
    run_id: str,
    names: Names = None,
    since: Since = None,
    max_points: MaxPoints = None,
) -> dict[str, Any]:
    """Per-layer vectors after ``since``; over budget, evenly spaced records are kept."""
    _check_since(since)
    store = _store(request)
    meta = await _require_meta(store, run_id)
    wanted = _names(names)
    records, cursor = await store.read(run_id, "layers", since)
    budget = max_points or request.app.state.settings.default_max_points
    if len(records) > budget:
        stride = len(records) / budget
        records = [records[min(len(records) - 1, math.floor(i * stride))] for i in range(budget)]
    series: dict[str, dict[str, list[Any]]] = {}
    for _, rec in records:
        for name, vec in rec["l"].items():
            if wanted is None or name in wanted:
                s = series.setdefault(name, {"step": [], "value": []})
                s["step"].append(rec["step"])
                s["value"].append([_clean(v) for v in vec])
    return {"layers": meta.get("layers") or [], "series": series, "cursor": cursor}


@router.get("/api/runs/{run_id}/spectrum", tags=["series"])
async def spectrum(request: Request, run_id: str, since: Since = None) -> dict[str, Any]:
    """Spectrum entries (top-k of W_s and of the current kernel) after ``since``."""
    _check_since(since)
    store = _store(request)
    await _require_meta(store, run_id)
    records, cursor = await store.read(run_id, "spectrum", since)
    entries = [
        {
            "step": rec["step"],
            "w_eigs": [_clean(x) for x in rec["w_eigs"]],
            "kernel_eigs": [_clean(x) for x in rec["kernel_eigs"]],
            "method": rec["method"],
            "probe_size": rec["probe_size"],
        }
        for _, rec in records
    ]
    return {"entries": entries, "cursor": cursor}


@router.get("/api/runs/{run_id}/hist", tags=["series"])
async def hist(request: Request, run_id: str, since: Since = None) -> dict[str, Any]:
    """Per-layer log-SNR histograms after ``since``: bin edges and one count row per layer."""
    _check_since(since)
    store = _store(request)
    meta = await _require_meta(store, run_id)
    records, cursor = await store.read(run_id, "hist", since)
    entries = [
        {
            "step": rec["step"],
            "edges": [_clean(x) for x in rec["edges"]],
            "counts": rec["counts"],
        }
        for _, rec in records
    ]
    return {"layers": meta.get("layers") or [], "entries": entries, "cursor": cursor}


@router.get("/api/runs/{run_id}/events", tags=["events"])
async def events(
    request: Request, run_id: str, kinds: Names = None, since: Since = None
) -> dict[str, Any]:
    """Events (phase changes, alerts, notes) after ``since``, optionally of some kinds."""
    _check_since(since)
    store = _store(request)
    await _require_meta(store, run_id)
    wanted = _names(kinds)
    records, cursor = await store.read(run_id, "events", since)
    out = [
        {
            "id": entry_id,
            "kind": rec["kind"],
            "step": rec["step"],
            "wall_time": rec["t"],
            "severity": rec["severity"],
            "message": rec["message"],
            "data": rec["data"],
        }
        for entry_id, rec in records
        if wanted is None or rec["kind"] in wanted
    ]
    return {"events": out, "cursor": cursor}
