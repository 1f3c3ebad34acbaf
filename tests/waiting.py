"""Wait for a condition against a deadline, never for a fixed time."""

import asyncio
import inspect
import time

POLL_SECONDS = 0.05


async def until(probe, done, *, timeout, what, interval=POLL_SECONDS):
    """Call ``probe`` until ``done(value)`` holds; return that value.

    ``probe`` may be a plain function or a coroutine function. At the deadline
    the test fails with ``what`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout}s")
        await asyncio.sleep(interval)
