"""Server settings, read from the environment (prefix ``CHANNELSCOPE_``) by pydantic-settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from monitor_agent.endpoint import home_dir
from monitor_agent.wire import DEFAULT_PREFIX


class Settings(BaseSettings):
    """Everything `create_app` needs; building one has no side effects."""

    model_config = SettingsConfigDict(env_prefix="CHANNELSCOPE_", extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis to read; None starts the embedded redis-server."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    prefix: str = DEFAULT_PREFIX
    home: Path = Field(default_factory=home_dir)
    poll_interval_s: float = Field(default=0.25, gt=0, description="ingest XREAD block time")
    crashed_after_s: float = Field(
        default=60.0, gt=0, description="a running run silent this long is reported crashed"
    )
    stalled_after_s: float = Field(
        default=300.0, gt=0, description="a running run with no data this long is stalled"
    )
    default_max_points: int = Field(default=2000, ge=2)
    auth: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="auto: tokens required unless bound to loopback (127.0.0.1, ::1)",
    )
    dashboard: bool = True
    dashboard_refresh_ms: int = Field(default=1000, ge=200)
    dashboard_max_points: int = Field(
        default=1000,
        ge=2,
        description="points per trace on the run page (one per pixel of a 1366-px panel)",
    )
