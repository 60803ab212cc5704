"""channelscope's service: reads Redis, serves the REST API and hosts the dashboard."""

from server.app import create_app
from server.settings import Settings

__all__ = ["Settings", "create_app"]
