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


def test_stop_within_gives_up_on_a_stop_that_never_ends() -> None:
    async def stuck() -> None:
        while True:  # failure injection: ignores every cancellation
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    async def quick() -> None:
        await asyncio.sleep(0)

    async def scenario() -> tuple[bool, bool]:
        gave_up = await asyncio.wait_for(stop_within(stuck(), 0.2), timeout=5)
        finished = await stop_within(quick(), 1.0)
        # The stuck coroutine's task is left running: end the test's loop without it.
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.get_coro().close()  # type: ignore[union-attr]
        return gave_up, finished

    assert asyncio.run(scenario()) == (False, True)
