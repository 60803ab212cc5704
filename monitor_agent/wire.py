"""The wire format: schema version, record kinds, Redis key builders, encode/decode.

This module is the single owner of what travels between the agent and the server
(DESIGN §2). It imports neither torch nor anything from the server, so the server can
import it alone.

Every stream entry carries one field, ``d``, holding a msgpack map with the schema
version under ``v``. Readers skip and count entries they cannot decode or whose version
they do not know; they never crash on them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

SCHEMA_VERSION: Final = 1
DEFAULT_PREFIX: Final = "cs:"
FIELD: Final = b"d"
# Streams are trimmed approximately to this many entries unless a writer asks otherwise.
DEFAULT_MAXLEN: Final = 1_000_000
# A single encoded record larger than this is refused by writers and skipped by readers.
MAX_RECORD_BYTES: Final = 4 * 1024 * 1024

STREAM_KINDS: Final = ("scalars", "layers", "hist", "spectrum", "events")
EVENT_KINDS: Final = frozenset(
    {
        "memorization_onset",
        "memorization_cleared",
        "alert",
        "run_started",
        "run_finished",
        "run_stalled",
        "non_finite",
        "note",
    }
)
SEVERITIES: Final = frozenset({"info", "warning", "error"})

_RUN_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_PROJECT = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


class WireError(ValueError):
    """A stream entry or meta hash that cannot be decoded."""

    reason = "malformed"


class MalformedRecord(WireError):
    """The entry is not a msgpack map of the expected shape."""

    reason = "malformed"


class UnknownSchema(WireError):
    """The entry carries a schema version this reader does not know."""

    reason = "unknown_schema"


class OversizedRecord(WireError):
    """The entry is larger than MAX_RECORD_BYTES."""

    reason = "oversized"


def valid_run_id(run_id: str) -> bool:
    """True when run_id is safe to embed in a key (no braces, no separators)."""
    return bool(_RUN_ID.match(run_id))


def valid_project(project: str) -> bool:
    """True when a project name is safe to embed in a key."""
    return bool(_PROJECT.match(project))


@dataclass(frozen=True)
class Keys:
    """Builds every Redis key of DESIGN §2 under one prefix.

    Run keys carry the run id inside braces, a Redis Cluster hash tag, so that all keys
    of one run live on one shard.
    """

    prefix: str = DEFAULT_PREFIX

    def runs(self) -> str:
        """ZSET of run ids scored by last-seen wall time (seconds)."""
        return f"{self.prefix}runs"

    def projects(self) -> str:
        """SET of project names that have at least one run."""
        return f"{self.prefix}projects"

    def project_runs(self, project: str) -> str:
        """ZSET of the runs of one project, scored by last-seen wall time."""
        return f"{self.prefix}project:{{{project}}}:runs"

    def meta(self, run_id: str) -> str:
        """HASH of run metadata."""
        return f"{self.prefix}run:{{{run_id}}}:meta"

    def stream(self, run_id: str, kind: str) -> str:
        """STREAM of one record kind of a run."""
        if kind not in STREAM_KINDS:
            raise ValueError(f"unknown stream kind {kind!r}")
        return f"{self.prefix}run:{{{run_id}}}:{kind}"

    def rollup(self, run_id: str, level: int) -> str:
        """Downsampled scalars of a run at one resolution level (server-owned)."""
        return f"{self.prefix}run:{{{run_id}}}:rollup:{level}"

    def run_state(self, run_id: str, part: str) -> str:
        """A key the server keeps about a run (server-owned): ``ingest`` cursors,
        ``latest`` values, the occupancy ``spark`` line, ``rollup:state``, ``rollup:lease``,
        ``alertstate`` (``*`` to match them all)."""
        return f"{self.prefix}run:{{{run_id}}}:{part}"

    def run_id_of(self, key: str) -> str | None:
        """The run id inside a run key, or None when key is not a run key."""
        head = f"{self.prefix}run:{{"
        if not key.startswith(head):
            return None
        end = key.find("}", len(head))
        return key[len(head) : end] if end > 0 else None


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, int | float):
        return float(x)
    raise MalformedRecord(f"expected a number, got {type(x).__name__}")


def _require(rec: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in rec:
        raise MalformedRecord(f"missing field {name!r}")
    value = rec[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MalformedRecord(f"field {name!r} has type {type(value).__name__}")
    return value


def _check_step_time(rec: Mapping[str, Any]) -> None:
    step = _require(rec, "step", int)
    if step < 0:
        raise MalformedRecord("negative step")
    _require(rec, "t", (int, float))


def _check_scalars(rec: Mapping[str, Any]) -> None:
    _check_step_time(rec)
    values = _require(rec, "s", dict)
    for name, value in values.items():
        if not isinstance(name, str):
            raise MalformedRecord("scalar names must be strings")
        if type(value) is not float:  # the common case first: this runs on every record
            _finite_or_none(value)


def _check_layers(rec: Mapping[str, Any]) -> None:
    _check_step_time(rec)
    series = _require(rec, "l", dict)
    for name, vec in series.items():
        if not isinstance(name, str) or not isinstance(vec, list):
            raise MalformedRecord("layer series must map names to lists")
        for x in vec:
            if type(x) is not float:
                _finite_or_none(x)


def _check_hist(rec: Mapping[str, Any]) -> None:
    _check_step_time(rec)
    _require(rec, "edges", list)
    counts = _require(rec, "counts", list)
    if not all(isinstance(row, list) for row in counts):
        raise MalformedRecord("hist counts must be a list of lists")


def _check_spectrum(rec: Mapping[str, Any]) -> None:
    _check_step_time(rec)
    _require(rec, "w_eigs", list)
    _require(rec, "kernel_eigs", list)
    _require(rec, "method", str)
    _require(rec, "probe_size", int)


def _check_event(rec: Mapping[str, Any]) -> None:
    kind = _require(rec, "kind", str)
    if kind not in EVENT_KINDS:
        raise MalformedRecord(f"unknown event kind {kind!r}")
    _check_step_time(rec)
    severity = _require(rec, "severity", str)
    if severity not in SEVERITIES:
        raise MalformedRecord(f"unknown severity {severity!r}")
    _require(rec, "message", str)
    _require(rec, "data", dict)


_CHECKS = {
    "scalars": _check_scalars,
    "layers": _check_layers,
    "hist": _check_hist,
    "spectrum": _check_spectrum,
    "events": _check_event,
}


def encode(
    kind: str,
    record: Mapping[str, Any],
    *,
    check: bool = True,
    packer: msgpack.Packer | None = None,
) -> dict[bytes, bytes]:
    """Stream entry fields for one record of the given kind; validates before encoding
    unless ``check`` is False (records the agent builds itself from floats on every
    emitted step; the server checks every record it reads). ``packer``: a msgpack Packer
    (use_bin_type=True) to reuse, owned by one thread at a time; packb makes a new one."""
    if kind not in _CHECKS:
        raise MalformedRecord(f"unknown record kind {kind!r}")
    body = dict(record)
    body["v"] = SCHEMA_VERSION
    if check:
        _CHECKS[kind](body)
    packed = msgpack.packb(body, use_bin_type=True) if packer is None else packer.pack(body)
    if len(packed) > MAX_RECORD_BYTES:
        raise OversizedRecord(f"{kind} record of {len(packed)} bytes")
    return {FIELD: packed}


def decode(kind: str, fields: Mapping[bytes | str, Any]) -> dict[str, Any]:
    """The record of one stream entry; raises a WireError subclass when it is unusable."""
    raw = fields.get(FIELD)
    if raw is None:
        raw = fields.get(FIELD.decode())
    if not isinstance(raw, bytes | bytearray):
        raise MalformedRecord("entry has no 'd' field")
    if len(raw) > MAX_RECORD_BYTES:
        raise OversizedRecord(f"{len(raw)} bytes")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise MalformedRecord(f"not msgpack: {exc}") from exc
    if not isinstance(body, dict):
        raise MalformedRecord("entry is not a map")
    version = body.get("v")
    if version != SCHEMA_VERSION:
        raise UnknownSchema(f"schema version {version!r}")
    _CHECKS[kind](body)
    return body


def json_number(x: float | None) -> float | None:
    """A float made JSON-safe: NaN and ±Inf become None."""
    if x is None or not math.isfinite(x):
        return None
    return x


def json_safe(obj: Any) -> Any:
    """A copy of nested dicts/lists with NaN and ±Inf floats replaced by None."""
    if isinstance(obj, float):
        return json_number(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


# Meta hash fields that hold JSON rather than plain strings.
META_JSON_FIELDS: Final = ("config", "layers", "settings", "tags")


def encode_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    """HASH fields for run metadata: JSON for structured fields, str for the rest."""
    out: dict[str, str] = {"schema_version": str(SCHEMA_VERSION)}
    for name, value in meta.items():
        if name in META_JSON_FIELDS:
            out[name] = json.dumps(value, default=str, allow_nan=False)
        else:
            out[name] = str(value)
    return out


def decode_meta(fields: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    """Run metadata from its HASH; undecodable JSON fields come back as None."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        name = key.decode() if isinstance(key, bytes) else key
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if name in META_JSON_FIELDS:
            try:
                out[name] = json.loads(text)
            except ValueError:
                out[name] = None
        else:
            out[name] = text
    return out
