"""The HTTP contract of DESIGN §5.1: runs, meta, series, spectra, events, health."""

from __future__ import annotations

from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from monitor_agent import wire
from server.auth import ANONYMOUS_ADMIN, Principal, resolve
from server.downsample import downsample
from server.export import scalar_table, to_csv, to_parquet
from server.ingest import Ingestor
from server.live import stream_run
from server.rollups import read_rolled
from server.store import Store, valid_cursor

COOKIE = "cs_token"


async def principal(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer`` or the dashboard's cookie; 401 without
    a valid token unless the server runs without auth (embedded, on loopback)."""
    if not request.app.state.auth_required:
        return ANONYMOUS_ADMIN
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else None
    token = token or request.cookies.get(COOKIE)
    if not token:
        raise HTTPException(401, "missing token", headers={"WWW-Authenticate": "Bearer"})
    store = _store(request)
    found = await resolve(store.client, request.app.state.settings.prefix, token)
    if found is None:
        raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return found


def need(role: str) -> Any:
    """A dependency that requires at least ``role`` (on any project; routes of one run
    check that run's project too)."""

    async def check(request: Request) -> Principal:
        who = await principal(request)
        if not who.allows(role):
            raise HTTPException(
                403, f"this token's role {who.role!r} cannot do this ({role} needed)"
            )
        request.state.principal = who
        return who

    return check


router = APIRouter()
api = APIRouter(dependencies=[Depends(need("read"))])

Since = Annotated[
    str | None,
    Query(description="stream cursor from a previous response; only newer entries are returned"),
]
# A histogram entry is layers × 24 counts: a smaller default budget than a scalar's.
HIST_BUDGET = 200
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


async def _require_meta(
    store: Store, run_id: str, request: Request | None = None, role: str = "read"
) -> dict[str, Any]:
    meta = await store.meta(run_id) if wire.valid_run_id(run_id) else None
    if meta is None:
        raise HTTPException(status_code=404, detail=f"run {run_id!r} not found")
    who: Principal | None = getattr(request.state, "principal", None) if request else None
    if who is not None and not who.allows(role, meta.get("project")):
        raise HTTPException(
            403, f"this token has no {role} access to project {meta.get('project')!r}"
        )
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


@api.get("/api/runs", tags=["runs"])
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
    who: Principal = request.state.principal
    if who.project != "*":
        if project not in (None, who.project):
            raise HTTPException(403, f"this token has no access to project {project!r}")
        project = who.project
    return {"runs": await _store(request).list_runs(project, status, q, limit)}


@api.get("/api/runs/{run_id}", tags=["runs"])
async def run_meta(request: Request, run_id: str) -> dict[str, Any]:
    """Run metadata: summary plus config, layer names in order, and agent settings."""
    store = _store(request)
    meta = await _require_meta(store, run_id, request)
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


@api.get("/api/runs/{run_id}/scalars", tags=["series"])
async def scalars(
    request: Request,
    run_id: str,
    names: Names = None,
    since: Since = None,
    max_points: MaxPoints = None,
    with_time: Annotated[bool, Query(description="add each point's wall time (s)")] = False,
) -> dict[str, Any]:
    """Scalar series after ``since``, each downsampled to ``max_points`` keeping min/max."""
    _check_since(since)
    store = _store(request)
    await _require_meta(store, run_id, request)
    wanted = _names(names)
    budget = max_points or request.app.state.settings.default_max_points
    if since is None and not with_time:
        # A long run: rollups for what they cover, the raw stream for the rest.
        length = await store.client.xlen(store.keys.stream(run_id, "scalars"))
        rolled = await read_rolled(store, run_id, wanted, budget) if length > 4 * budget else None
        if rolled is not None:
            return {"series": rolled[0], "cursor": rolled[1], "source": "rollup"}
    records, cursor = await store.read(run_id, "scalars", since)
    points: dict[str, list[tuple[int, float | None]]] = {}
    wall: dict[int, float] = {}
    for _, rec in records:
        wall[rec["step"]] = rec["t"]
        for name, value in rec["s"].items():
            if wanted is None or name in wanted:
                points.setdefault(name, []).append((rec["step"], _clean(value)))
    series: dict[str, Any] = {}
    for name, pts in sorted(points.items()):
        pts.sort(key=lambda p: p[0])
        out: dict[str, Any] = dict(
            downsample([p[0] for p in pts], [p[1] for p in pts], budget).as_json()
        )
        if with_time:
            out["wall_time"] = [wall[s] for s in out["step"]]
        series[name] = out
    return {"series": series, "cursor": cursor}


@api.get("/api/runs/{run_id}/layers", tags=["series"])
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
    meta = await _require_meta(store, run_id, request)
    wanted = _names(names)
    budget = max_points or request.app.state.settings.default_max_points
    records, cursor = await store.read_spread(run_id, "layers", since, budget)
    series: dict[str, dict[str, list[Any]]] = {}
    for _, rec in records:
        for name, vec in rec["l"].items():
            if wanted is None or name in wanted:
                s = series.setdefault(name, {"step": [], "value": []})
                s["step"].append(rec["step"])
                s["value"].append([_clean(v) for v in vec])
    return {"layers": meta.get("layers") or [], "series": series, "cursor": cursor}


@api.get("/api/runs/{run_id}/spectrum", tags=["series"])
async def spectrum(
    request: Request, run_id: str, since: Since = None, max_points: MaxPoints = None
) -> dict[str, Any]:
    """Spectrum entries (top-k of W_s and of the current kernel) after ``since``; over
    ``max_points``, evenly spaced entries (always including the newest) are kept."""
    _check_since(since)
    store = _store(request)
    await _require_meta(store, run_id, request)
    budget = max_points or request.app.state.settings.default_max_points
    records, cursor = await store.read_spread(run_id, "spectrum", since, budget)
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


@api.get("/api/runs/{run_id}/hist", tags=["series"])
async def hist(
    request: Request, run_id: str, since: Since = None, max_points: MaxPoints = None
) -> dict[str, Any]:
    """Per-layer log-SNR histograms after ``since``: bin edges and one count row per
    layer; over ``max_points`` (default 200), evenly spaced entries are kept."""
    _check_since(since)
    store = _store(request)
    meta = await _require_meta(store, run_id, request)
    records, cursor = await store.read_spread(run_id, "hist", since, max_points or HIST_BUDGET)
    entries = [
        {
            "step": rec["step"],
            "edges": [_clean(x) for x in rec["edges"]],
            "counts": rec["counts"],
        }
        for _, rec in records
    ]
    return {"layers": meta.get("layers") or [], "entries": entries, "cursor": cursor}


@api.get("/api/runs/{run_id}/events", tags=["events"])
async def events(
    request: Request, run_id: str, kinds: Names = None, since: Since = None
) -> dict[str, Any]:
    """Events (phase changes, alerts, notes) after ``since``, optionally of some kinds."""
    _check_since(since)
    store = _store(request)
    await _require_meta(store, run_id, request)
    wanted = _names(kinds)
    records, cursor = await store.read(run_id, "events", since)
    out = []
    seen: set[str] = set()
    for entry_id, rec in records:
        eid = rec.get("eid")
        if isinstance(eid, str):
            if eid in seen:  # the same agent event replayed from a spool
                continue
            seen.add(eid)
        if wanted is None or rec["kind"] in wanted:
            out.append(
                {
                    "id": entry_id,
                    "kind": rec["kind"],
                    "step": rec["step"],
                    "wall_time": rec["t"],
                    "severity": rec["severity"],
                    "message": rec["message"],
                    "data": wire.json_safe(rec["data"]),
                }
            )
    return {"events": out, "cursor": cursor}


@api.get("/api/runs/{run_id}/export", tags=["runs"])
async def export(
    request: Request,
    run_id: str,
    format: Annotated[str, Query(pattern="^(csv|parquet)$")] = "csv",
) -> Response:
    """A run's scalars as CSV or Parquet: one row per step, one column per series."""
    store = _store(request)
    await _require_meta(store, run_id, request)
    records, _ = await store.read(run_id, "scalars", None)
    columns, rows = scalar_table(records)
    name = f"{run_id}.{format}"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if format == "csv":
        return Response(to_csv(columns, rows), media_type="text/csv", headers=headers)
    try:
        body = to_parquet(columns, rows)
    except ImportError as exc:
        raise HTTPException(501, "Parquet export needs pyarrow (channelscope[export])") from exc
    return Response(body, media_type="application/vnd.apache.parquet", headers=headers)


@api.delete("/api/runs/{run_id}", tags=["runs"], dependencies=[Depends(need("admin"))])
async def delete_run(request: Request, run_id: str) -> dict[str, Any]:
    """Delete a run and all its keys (admin only)."""
    store = _store(request)
    meta = await _require_meta(store, run_id, request, role="admin")
    await store.delete_run(run_id, meta.get("project", ""))
    return {"deleted": run_id}


@api.get("/api/runs/{run_id}/live", tags=["live"])
async def live(
    request: Request,
    run_id: str,
    since: Since = None,
) -> StreamingResponse:
    """Server-sent events of the run's scalars, layers, histograms, spectrum and events
    as they arrive; reconnect with Last-Event-ID (or ``since``) to resume with no gap."""
    _check_since(since)
    store = _store(request)
    await _require_meta(store, run_id, request)
    cursor = request.headers.get("last-event-id") or since or "$"
    if cursor != "$" and not valid_cursor(cursor):
        raise HTTPException(422, "Last-Event-ID must be a stream id")
    if cursor == "$":
        # Start at the newest entry of any stream: only what arrives from now on.
        newest = "0-0"
        for kind in wire.STREAM_KINDS:
            last: Any = await store.client.xrevrange(store.keys.stream(run_id, kind), count=1)
            if last:
                entry = last[0][0].decode()
                if tuple(map(int, entry.split("-"))) > tuple(map(int, newest.split("-"))):
                    newest = entry
        cursor = newest
    return StreamingResponse(
        stream_run(request, store, run_id, cursor),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
