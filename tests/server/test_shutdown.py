"""Background loops stop even when a Redis call swallows their cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.app import stop_within
from server.ingest import Ingestor
from server.rollups import RollupWriter


class SwallowingPass:
    """Failure injection: a client call that eats the CancelledError meant for its task,
    as redis-py's async client has done in some races (until ``release``)."""

    def __init__(self) -> None:
        self.release = False

    async def __call__(self, *_: Any) -> int:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if self.release:
                raise
        return 0


async def _no_retention() -> None:
    return None


@pytest.mark.parametrize("kind", ["ingest", "rollups"])
def test_stop_ends_a_loop_whose_cancellation_is_swallowed(kind: str) -> None:
    swallow = SwallowingPass()

    async def scenario() -> bool:
        if kind == "ingest":
            worker: Any = Ingestor(store=None, interval_s=0.01)  # type: ignore[arg-type]
            worker.pass_once = swallow
        else:
            worker = RollupWriter(store=None, interval_s=0.01)  # type: ignore[arg-type]
            worker.process_once = swallow
            worker.apply_retention = _no_retention
        worker.start()
        await asyncio.sleep(0.1)
        stopper = asyncio.ensure_future(worker.stop())
        done, _ = await asyncio.wait({stopper}, timeout=5)
        # Whatever happened, let the loop go, so a failure ends instead of hanging.
        swallow.release = True
        worker._task.cancel()
        await asyncio.wait({stopper}, timeout=5)
        return stopper in done

    assert asyncio.run(scenario()), "stop() waited on a loop that ignored its cancellation"


def test_stop_within_gives_up_on_a_stop_that_ignores_its_cancellation() -> None:
    async def stuck(release_after_s: float) -> None:
        # Failure injection: ignores every cancellation until release_after_s has passed
        # (bounded, so a stop_within that waits for it fails instead of hanging).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + release_after_s
        while loop.time() < deadline:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    async def quick() -> None:
        await asyncio.sleep(0)

    async def scenario() -> tuple[bool, bool, bool]:
        gave_up = await stop_within(stuck(2.0), 0.2)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        # Left behind: still running, not waited for after its cancellation.
        left_behind = len(others) == 1 and not any(t.done() for t in others)
        await asyncio.gather(*others)
        finished = await stop_within(quick(), 1.0)
        return gave_up, left_behind, finished

    assert asyncio.run(scenario()) == (False, True, True)
