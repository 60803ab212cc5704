"""The OpenAPI spec fuzzed with schemathesis against the real server: no 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402

# The schema comes from the app object itself; the live SSE route never ends, so it is
# left to its own tests.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(redis_url="redis://127.0.0.1:1/0", dashboard=False)).openapi()
).exclude(path_regex=r".*/live$")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: object, live_server: object) -> None:
    case.call_and_validate(base_url=live_server.url, checks=[not_a_server_error])  # type: ignore[attr-defined]
