"""A decorator for a plain PyTorch training function: the run is created before the call,
passed as ``run=``, and finished after it (``crashed`` when it raises)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from monitor_agent.run import init

F = TypeVar("F", bound=Callable[..., Any])


def monitored(project: str, name: str | None = None, config: Mapping[str, Any] | None = None,
              redis_url: str | None = None, **init_kwargs: Any) -> Callable[[F], F]:  # fmt: skip
    """``@monitored("proj")`` on ``def train(..., run)``: a run around each call."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with init(project, name or fn.__name__, config, redis_url, **init_kwargs) as run:
                return fn(*args, run=run, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
