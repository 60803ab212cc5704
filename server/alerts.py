"""Alert rules, their evaluation across server replicas, and webhook notifications.

* Rules live per project in the HASH ``<prefix>project:{p}:rules`` (JSON per rule).
* Every replica reads each active run's ``scalars`` and ``events`` streams through one
  Redis consumer group, so each record is evaluated by exactly one replica; entries left
  pending by a dead replica are claimed with XAUTOCLAIM after ``claim_idle_ms``.
* Firing is one Lua script: ``SET NX EX cooldown`` on the (rule, run) key, and only if it
  was set, an ``alert`` event on the run and an entry in the notification outbox. A
  record evaluated twice (after a crash) therefore never fires twice.
* Notifiers read the outbox through their own consumer group and POST the webhook with
  exponential backoff; the entry is acknowledged right after delivery. Each request
  carries ``X-Channelscope-Alert-Id`` (the outbox id) so a receiver can drop the rare
  duplicate of a replica that died between delivery and acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import socket
import time
from typing import Annotated, Any, Literal

import httpx
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from pydantic import BaseModel, Field, HttpUrl

from monitor_agent import wire
from server.api import _require_meta, need
from server.store import Store

log = logging.getLogger("channelscope.alerts")

GROUP = "cs-alerts"
NOTIFY_GROUP = "cs-notifiers"
ProjectName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")]

FIRE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[2])
  redis.call('XADD', KEYS[3], '*', 'd', ARGV[3])
  return 1
end
return 0
"""


class Rule(BaseModel):
    """An alert rule of a project."""

    kind: Literal["threshold", "non_finite", "memorization_onset", "stalled"]
    name: str = Field(default="", max_length=200)
    series: str | None = Field(default=None, description="scalar name (threshold, non_finite)")
    op: Literal["above", "below"] = "above"
    value: float | None = None
    for_points: int = Field(default=1, ge=1, le=10_000)
    seconds: float = Field(default=300.0, gt=0, description="stalled: silence before firing")
    webhook_url: HttpUrl | None = None
    webhook_format: Literal["json", "slack"] = "json"
    cooldown_s: float = Field(default=600.0, ge=1)
    enabled: bool = True

    def check(self) -> None:
        """Rule-kind specific requirements (a 422 when unmet)."""
        if self.kind == "threshold" and (self.series is None or self.value is None):
            raise HTTPException(422, "a threshold rule needs series and value")
        if self.value is not None and not math.isfinite(self.value):
            raise HTTPException(422, "value must be finite")


def rules_key(store: Store, project: str) -> str:
    """The HASH of a project's rules."""
    return f"{store.keys.prefix}project:{{{project}}}:rules"


def outbox_key(store: Store) -> str:
    """The notification outbox stream."""
    return f"{store.keys.prefix}notify"


async def load_rules(store: Store, project: str) -> list[dict[str, Any]]:
    """The project's rules, each with its id."""
    raw: Any = await store.client.hgetall(rules_key(store, project))
    out = []
    for rid, body in raw.items():
        rule = json.loads(body)
        rule["id"] = rid.decode() if isinstance(rid, bytes) else rid
        out.append(rule)
    return sorted(out, key=lambda r: r["id"])


router = APIRouter(tags=["alerts"])


@router.get("/api/projects/{project}/rules", dependencies=[Depends(need("read"))])
async def list_rules(request: Request, project: ProjectName) -> dict[str, Any]:
    """A project's alert rules."""
    _scope(request, project, "read")
    return {"rules": await load_rules(request.app.state.store, project)}


def _scope(request: Request, project: str, role: str) -> None:
    who = request.state.principal
    if not who.allows(role, project):
        raise HTTPException(403, f"this token has no {role} access to project {project!r}")


@router.post(
    "/api/projects/{project}/rules", dependencies=[Depends(need("write"))], status_code=201
)
async def create_rule(request: Request, project: ProjectName, rule: Rule) -> dict[str, Any]:
    """Create a rule; returns it with its id."""
    _scope(request, project, "write")
    rule.check()
    rid = secrets.token_hex(4)
    store: Store = request.app.state.store
    await store.client.hset(rules_key(store, project), rid, rule.model_dump_json())
    return {"id": rid, **json.loads(rule.model_dump_json())}


@router.put("/api/projects/{project}/rules/{rule_id}", dependencies=[Depends(need("write"))])
async def update_rule(
    request: Request, project: ProjectName, rule_id: str, rule: Rule
) -> dict[str, Any]:
    """Replace a rule."""
    _scope(request, project, "write")
    rule.check()
    store: Store = request.app.state.store
    if not await store.client.hexists(rules_key(store, project), rule_id):
        raise HTTPException(404, f"rule {rule_id!r} not found")
    await store.client.hset(rules_key(store, project), rule_id, rule.model_dump_json())
    return {"id": rule_id, **json.loads(rule.model_dump_json())}


@router.delete("/api/projects/{project}/rules/{rule_id}", dependencies=[Depends(need("write"))])
async def delete_rule(request: Request, project: ProjectName, rule_id: str) -> dict[str, Any]:
    """Delete a rule."""
    _scope(request, project, "write")
    store: Store = request.app.state.store
    if not await store.client.hdel(rules_key(store, project), rule_id):
        raise HTTPException(404, f"rule {rule_id!r} not found")
    return {"deleted": rule_id}


@router.post("/api/projects/{project}/rules/{rule_id}/test", dependencies=[Depends(need("write"))])
async def test_rule(request: Request, project: ProjectName, rule_id: str) -> dict[str, Any]:
    """Send a test notification through the rule's webhook now."""
    _scope(request, project, "write")
    store: Store = request.app.state.store
    body = await store.client.hget(rules_key(store, project), rule_id)
    if body is None:
        raise HTTPException(404, f"rule {rule_id!r} not found")
    rule = json.loads(body)
    if not rule.get("webhook_url"):
        raise HTTPException(422, "this rule has no webhook_url")
    note = {"rule": {**rule, "id": rule_id}, "run_id": "", "project": project, "step": 0,
            "message": "channelscope test notification", "data": {"test": True}}  # fmt: skip
    status = await deliver(note, f"test-{secrets.token_hex(4)}", attempts=1)
    return {"delivered": status is not None and status < 300, "status": status}


@router.get("/api/runs/{run_id}/alerts", dependencies=[Depends(need("read"))])
async def run_alerts(request: Request, run_id: str) -> dict[str, Any]:
    """The alerts fired on a run (its ``alert`` events)."""
    store: Store = request.app.state.store
    await _require_meta(store, run_id, request)
    records, cursor = await store.read(run_id, "events", None)
    alerts = [
        {
            "id": eid,
            "step": r["step"],
            "wall_time": r["t"],
            "severity": r["severity"],
            "message": r["message"],
            "data": wire.json_safe(r["data"]),
        }
        for eid, r in records
        if r["kind"] == "alert"
    ]
    return {"alerts": alerts, "cursor": cursor}


def _payload(note: dict[str, Any], alert_id: str) -> dict[str, Any]:
    rule = note["rule"]
    if rule.get("webhook_format") == "slack":
        run = note.get("run_id") or "-"
        return {"text": f":rotating_light: [{note['project']}/{run}] {note['message']}"}
    return {"alert_id": alert_id, **note}


async def deliver(note: dict[str, Any], alert_id: str, attempts: int = 5) -> int | None:
    """POST one notification with exponential backoff; the final HTTP status, or None
    when every attempt failed to connect."""
    url = note["rule"].get("webhook_url")
    if not url:
        return 204
    status: int | None = None
    delay = 0.25
    async with httpx.AsyncClient(timeout=5.0) as client:
        for attempt in range(attempts):
            try:
                resp = await client.post(
                    url,
                    json=_payload(note, alert_id),
                    headers={"X-Channelscope-Alert-Id": alert_id},
                )
                status = resp.status_code
                if status < 500 and status != 429:
                    return status
            except httpx.HTTPError as exc:
                log.warning("webhook %s failed: %s", url, exc)
            if attempt + 1 < attempts:
                await asyncio.sleep(delay)
                delay *= 2
    return status


class AlertEngine:
    """The evaluator and the notifier of one server replica."""

    def __init__(self, store: Store, interval_s: float, claim_idle_ms: int = 30_000) -> None:
        self.store = store
        self.interval_s = interval_s
        self.claim_idle_ms = claim_idle_ms
        self.consumer = f"{socket.gethostname()}-{secrets.token_hex(3)}"
        self.fired = 0
        self.delivered = 0
        self.failed = 0
        self._fire = store.client.register_script(FIRE)
        self._groups: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the evaluator and notifier loops."""
        self._stopping = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._loop(self.evaluate_once), name="cs-alerts"),
            asyncio.create_task(self._loop(self.notify_once), name="cs-notify"),
        ]

    async def stop(self, grace_s: float = 8.0) -> None:
        """Stop both loops; a delivery in progress is finished (and acknowledged) first,
        so a restart does not send it again."""
        self._stopping.set()
        _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _loop(self, once: Any) -> None:
        while not self._stopping.is_set():
            try:
                await once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis may go away; the loop must outlive it
                log.warning("alert loop: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)

    async def _group(self, key: str, group: str) -> None:
        if (key, group) in self._groups:
            return
        try:
            await self.store.client.xgroup_create(key, group, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((key, group))

    async def _entries(self, key: str, group: str) -> list[tuple[Any, Any]]:
        """Pending entries of dead consumers first, then new ones."""
        await self._group(key, group)
        claimed: Any = await self.store.client.xautoclaim(
            key, group, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=200
        )
        entries = list(claimed[1]) if claimed else []
        fresh: Any = await self.store.client.xreadgroup(group, self.consumer, {key: ">"}, count=500)
        for _, items in fresh or []:
            entries.extend(items)
        return entries

    async def evaluate_once(self) -> None:
        """Evaluate what arrived on every active run, and check for stalled runs."""
        client, keys = self.store.client, self.store.keys
        rules_by_project: dict[str, list[dict[str, Any]]] = {}
        for run_id in await self.store.active_runs():
            meta = await self.store.meta(run_id)
            if meta is None:
                continue
            project = meta.get("project", "")
            if project not in rules_by_project:
                rules_by_project[project] = [
                    r for r in await load_rules(self.store, project) if r.get("enabled", True)
                ]
            rules = rules_by_project[project]
            for kind in ("scalars", "events"):
                key = keys.stream(run_id, kind)
                entries = await self._entries(key, GROUP)
                for entry_id, fields in entries:
                    try:
                        rec = wire.decode(kind, fields)
                    except wire.WireError:
                        rec = None
                    if rec is not None and rules:
                        await self._evaluate(run_id, project, kind, rec, rules)
                    await client.xack(key, GROUP, entry_id)
            await self._stalled(run_id, project, meta, rules)

    async def _evaluate(
        self, run_id: str, project: str, kind: str, rec: dict[str, Any], rules: list[dict[str, Any]]
    ) -> None:
        state_key = self.store.keys.run_state(run_id, "alertstate")
        for rule in rules:
            if kind == "events":
                if rule["kind"] == "memorization_onset" and rec["kind"] == "memorization_onset":
                    await self.fire(rule, run_id, project, rec["step"], rec["message"], rec["data"])
                if rule["kind"] == "non_finite" and rec["kind"] == "non_finite":
                    await self.fire(rule, run_id, project, rec["step"], rec["message"], rec["data"])
                continue
            values = rec["s"]
            if rule["kind"] == "non_finite":
                bad = {n: v for n, v in values.items()
                       if (rule.get("series") in (None, n)) and not math.isfinite(v)}  # fmt: skip
                if bad:
                    msg = f"non-finite value of {', '.join(sorted(bad))} at step {rec['step']}"
                    await self.fire(
                        rule,
                        run_id,
                        project,
                        rec["step"],
                        msg,
                        {"values": {k: str(v) for k, v in bad.items()}},
                    )
            elif rule["kind"] == "threshold" and rule.get("series") in values:
                v = values[rule["series"]]
                hit = math.isfinite(v) and (
                    v > rule["value"] if rule["op"] == "above" else v < rule["value"]
                )
                if not hit:
                    await self.store.client.hdel(state_key, rule["id"])
                    continue
                count = await self.store.client.hincrby(state_key, rule["id"], 1)
                if count >= rule.get("for_points", 1):
                    msg = (f"{rule['series']} = {v:.4g} {rule['op']} {rule['value']} "
                           f"for {count} points at step {rec['step']}")  # fmt: skip
                    await self.fire(
                        rule, run_id, project, rec["step"], msg, {"value": v, "points": count}
                    )
        if kind == "scalars" and any(r["kind"] == "threshold" for r in rules):
            await self.store.after_server_write(run_id)

    async def _stalled(
        self, run_id: str, project: str, meta: dict[str, Any], rules: list[dict[str, Any]]
    ) -> None:
        if meta.get("status", "running") != "running":
            return
        try:
            silent = time.time() - float(meta.get("updated_at") or 0)
        except ValueError:
            return
        for rule in rules:
            if rule["kind"] == "stalled" and silent >= rule.get("seconds", 300.0):
                step = int(meta.get("step") or 0)
                await self.fire(
                    rule, run_id, project, step, f"no data for {silent:.0f} s", {"silent_s": silent}
                )

    async def fire(
        self,
        rule: dict[str, Any],
        run_id: str,
        project: str,
        step: int,
        message: str,
        data: dict[str, Any],
    ) -> bool:
        """Fire a rule on a run unless it fired within its cooldown; True when it fired."""
        keys = self.store.keys
        text = f"[{rule.get('name') or rule['kind']}] {message}"
        safe = _jsonable(data)
        event = {
            "kind": "alert",
            "step": step,
            "t": time.time(),
            "severity": "warning",
            "message": text,
            "data": {"rule_id": rule["id"], "rule_kind": rule["kind"], **safe},
        }
        note = {
            "rule": rule,
            "run_id": run_id,
            "project": project,
            "step": step,
            "message": text,
            "data": safe,
        }
        dedupe = f"{keys.prefix}alert:{{{run_id}}}:{rule['id']}"
        fired = await self._fire(
            keys=[dedupe, keys.stream(run_id, "events"), outbox_key(self.store)],
            args=[
                int(rule.get("cooldown_s", 600)),
                wire.encode("events", event)[wire.FIELD],
                json.dumps(note),
            ],
        )
        if fired:
            self.fired += 1
        return bool(fired)

    async def notify_once(self) -> None:
        """Deliver what the outbox holds (and what dead notifiers left pending)."""
        key = outbox_key(self.store)
        client = self.store.client
        for entry_id, fields in await self._entries(key, NOTIFY_GROUP):
            if self._stopping.is_set():
                return  # the rest stays pending for the next notifier
            alert_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            marker = f"{self.store.keys.prefix}delivered:{alert_id}"
            if await client.exists(marker):
                # Delivered by a notifier that died before acknowledging: never twice.
                await client.xack(key, NOTIFY_GROUP, entry_id)
                continue
            try:
                note = json.loads(fields[b"d"])
            except (KeyError, ValueError):
                await client.xack(key, NOTIFY_GROUP, entry_id)
                continue
            status = await deliver(note, alert_id)
            if status is not None and status < 300:
                await client.set(marker, "1", ex=7 * 24 * 3600)
                self.delivered += 1
            else:
                self.failed += 1
                log.warning("alert %s not delivered (status %s)", alert_id, status)
            await client.xack(key, NOTIFY_GROUP, entry_id)


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = wire.json_safe(json.loads(json.dumps(data, default=str)))
    return out
