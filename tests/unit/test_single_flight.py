"""The single-flight helper: one shared task per key, owned by the helper, not the callers."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.single_flight import SingleFlight


class Work:
    """Counts runs where they happen; each run waits until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail: BaseException | None = None

    async def __call__(self) -> int:
        self.runs += 1
        run = self.runs
        self.started.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return run


async def test_concurrent_callers_share_one_run() -> None:
    flight: SingleFlight[str, int] = SingleFlight("test")
    work = Work()
    waiters = [asyncio.ensure_future(flight.join("k", work)) for _ in range(50)]
    await work.started.wait()
    work.release.set()
    assert await asyncio.gather(*waiters) == [1] * 50
    assert work.runs == 1
    assert len(flight) == 0


async def test_a_cancelled_waiter_never_cancels_the_shared_work() -> None:
    flight: SingleFlight[str, int] = SingleFlight("test")
    work = Work()
    first = asyncio.ensure_future(flight.join("k", work))
    second = asyncio.ensure_future(flight.join("k", work))
    await work.started.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    work.release.set()
    assert await second == 1
    assert work.runs == 1


async def test_an_exception_reaches_every_waiter() -> None:
    flight: SingleFlight[str, int] = SingleFlight("test")
    work = Work()
    work.fail = ValueError("boom")
    waiters = [asyncio.ensure_future(flight.join("k", work)) for _ in range(3)]
    await work.started.wait()
    work.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [type(r) for r in results] == [ValueError] * 3


async def test_the_next_call_after_completion_starts_fresh() -> None:
    flight: SingleFlight[str, int] = SingleFlight("test")
    work = Work()
    work.release.set()
    assert await flight.join("k", work) == 1
    assert await flight.join("k", work) == 2
    assert await flight.join("other", work) == 3


async def test_forget_starts_fresh_while_the_old_run_finishes_for_its_waiters() -> None:
    flight: SingleFlight[str, int] = SingleFlight("test")
    work = Work()
    old = asyncio.ensure_future(flight.join("k", work))
    await work.started.wait()
    flight.forget("k")
    new = asyncio.ensure_future(flight.join("k", work))
    await asyncio.sleep(0)  # let the new task start its run (a yield, not a wait)
    work.release.set()
    assert sorted(await asyncio.gather(old, new)) == [1, 2]


async def test_aclose_waits_its_grace_then_cancels_what_is_left() -> None:
    flight: SingleFlight[str, int] = SingleFlight("test")
    done, stuck = Work(), Work()
    done.release.set()
    finished = flight.start("done", done)
    hanging = flight.start("stuck", stuck)
    flight.forget("stuck")  # forgotten work is still owned and closed
    await stuck.started.wait()
    await flight.aclose(grace_s=0.05)
    assert finished.result() == 1
    assert hanging.cancelled()
    assert len(flight) == 0


@given(st.lists(st.sampled_from(["join", "cancel", "fail"]), max_size=12))
async def test_every_waiter_gets_the_one_runs_outcome_unless_it_was_cancelled(
    steps: list[str],
) -> None:
    flight: SingleFlight[str, int] = SingleFlight("test")
    work = Work()
    waiters: list[asyncio.Future[int]] = []
    cancelled: set[int] = set()
    for step in steps:
        if step == "join":
            waiters.append(asyncio.ensure_future(flight.join("k", work)))
            await asyncio.sleep(0)  # a yield: the join reaches the flight
        elif step == "cancel" and waiters:
            waiters[-1].cancel()
            cancelled.add(len(waiters) - 1)
        elif step == "fail":
            work.fail = RuntimeError("down")
    work.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert work.runs == (1 if waiters else 0)  # everyone joined the one run under way
    outcome: object = RuntimeError if work.fail is not None else 1
    for index, result in enumerate(results):
        if index in cancelled:
            assert isinstance(result, asyncio.CancelledError)
        elif outcome is RuntimeError:
            assert isinstance(result, RuntimeError)
        else:
            assert result == outcome
    assert len(flight) == 0
    await flight.aclose()
