"""State and background tasks kept once per event loop."""

import asyncio

from chat.loops import BackgroundTask, PerLoop


async def test_a_per_loop_value_is_made_once_per_loop_and_forgotten_on_pop():
    made = []
    values = PerLoop(lambda: made.append(len(made)) or f"value {len(made)}")
    assert values.get() == "value 1"
    assert values.get() == "value 1"
    other = await asyncio.to_thread(asyncio.run, _get_in_new_loop(values))
    assert other == "value 2"
    assert values.pop() == "value 1"
    assert values.pop() is None
    assert values.get() == "value 3"


async def _get_in_new_loop(values):
    return values.get()


async def test_a_background_task_runs_once_until_it_ends_and_stops_on_demand():
    runs = []
    started = asyncio.Event()
    release = asyncio.Event()

    async def work(name):
        runs.append(name)
        started.set()
        await release.wait()

    task = BackgroundTask(work)
    task.start("first")
    task.start("second")  # already running: not started again
    await asyncio.wait_for(started.wait(), timeout=2)
    first = task.slots.get().task
    release.set()
    await asyncio.wait_for(first, timeout=2)
    assert runs == ["first"]
    started.clear()
    release.clear()
    task.start("third")  # the first one ended: start anew
    await asyncio.wait_for(started.wait(), timeout=2)
    assert runs == ["first", "third"]
    running = task.slots.get().task
    await task.stop()
    assert running.cancelled()
    await task.stop()  # nothing left to stop
