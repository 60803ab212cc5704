"""Tokens and roles: admin ⊃ write ⊃ read, scoped to one project or to all ('*').

Tokens are random strings shown once at creation; Redis keeps only their SHA-256 in the
HASH ``<prefix>tokens`` (field = hash, value = JSON with role, project, name, created
time). A token's id is the first 12 hex digits of its hash: it names the token for
listing and revocation without revealing it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

ROLES = ("read", "write", "admin")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a role and the project it may touch ('*' for all)."""

    role: str
    project: str
    token_id: str

    def allows(self, role: str, project: str | None = None) -> bool:
        """True when this principal has at least ``role`` on ``project``."""
        if ROLES.index(self.role) < ROLES.index(role):
            return False
        return project is None or self.project in ("*", project)


ANONYMOUS_ADMIN = Principal("admin", "*", "anonymous")


def tokens_key(prefix: str) -> str:
    """The HASH of token hashes."""
    return f"{prefix}tokens"


def digest(token: str) -> str:
    """SHA-256 of a token, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    client: redis.Redis, prefix: str, role: str, project: str, name: str = ""
) -> tuple[str, str]:
    """Create a token; returns (token, id). The token is not stored anywhere."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {ROLES}")
    token = "cs_" + secrets.token_urlsafe(32)
    h = digest(token)
    record = {"role": role, "project": project, "name": name, "created_at": time.time()}
    client.hset(tokens_key(prefix), h, json.dumps(record))
    return token, h[:12]


def list_tokens(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Token records (id, role, project, name, created_at), never the tokens."""
    out = []
    raw: dict[bytes, bytes] = client.hgetall(tokens_key(prefix))  # type: ignore[assignment]
    for h, value in raw.items():
        rec = json.loads(value)
        out.append({"id": h.decode()[:12], **rec})
    return sorted(out, key=lambda r: r["created_at"])


def revoke_token(client: redis.Redis, prefix: str, token_id: str) -> bool:
    """Remove the token whose id (hash prefix) is token_id; True when one was removed."""
    raw: dict[bytes, bytes] = client.hgetall(tokens_key(prefix))  # type: ignore[assignment]
    for h in raw:
        if h.decode().startswith(token_id) and len(token_id) >= 8:
            client.hdel(tokens_key(prefix), h)
            return True
    return False


async def resolve(client: aioredis.Redis, prefix: str, token: str) -> Principal | None:
    """The principal of a presented token, or None when it is unknown or revoked."""
    h = digest(token)
    value = await client.hget(tokens_key(prefix), h)
    if value is None:
        return None
    rec = json.loads(value)
    return Principal(rec["role"], rec["project"], h[:12])
