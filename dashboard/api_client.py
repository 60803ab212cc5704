"""The dashboard's only data source: the server's HTTP API.

By default requests go through the ASGI app in the same process (real routing,
validation and auth, no socket); with ``base_url`` they go over the network to any
channelscope server.
"""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(RuntimeError):
    """The API answered with an error status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class ApiClient:
    """Async client of the routes of DESIGN §5.1."""

    def __init__(self, app: Any = None, base_url: str | None = None, timeout: float = 10.0) -> None:
        if base_url:
            self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout)
        else:
            self._client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://channelscope",
                timeout=timeout,
            )

    async def get(self, path: str, token: str | None = None, **params: Any) -> Any:
        """GET a JSON document; params that are None are left out. Without an explicit
        token the signed-in user's (from the request's cookie) is used."""
        query = {k: v for k, v in params.items() if v is not None}
        return await self.request("GET", path, token, params=query)

    async def request(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        """Any method; JSON in (``json=``) and out; raises ApiError on an error status."""
        from server.signin import current_token

        token = token or current_token.get()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = await self._client.request(method, path, headers=headers, **kwargs)
        if resp.status_code >= 400:
            try:
                detail = str(resp.json().get("detail"))
            except ValueError:
                detail = resp.text[:200]
            raise ApiError(resp.status_code, detail)
        return resp.json()

    async def aclose(self) -> None:
        """Close the underlying connection pool."""
        await self._client.aclose()
