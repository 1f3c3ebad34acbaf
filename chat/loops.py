"""State and background tasks kept once per running event loop.

A server process runs one loop, but tests run many (one per test, or one per
session): whatever a process keeps for its sockets (the hub, the presence
store, the writer, the keeper tasks) is kept per loop, and dropped with it.
"""

import asyncio
import logging
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from chat import logs

T = TypeVar("T")

logger = logging.getLogger(__name__)


class PerLoop(Generic[T]):
    """One value per running event loop, made by ``factory`` on first use."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self.factory = factory
        self.values: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        value = self.values.get(loop)
        if value is None:
            value = self.values[loop] = self.factory()
        return value

    def pop(self) -> T | None:
        """Forget the running loop's value; return it, or None if there was none."""
        return self.values.pop(asyncio.get_running_loop(), None)


class _TaskSlot:
    task: asyncio.Task | None = None


class BackgroundTask:
    """A coroutine run once per event loop: started on demand, stopped by tests."""

    def __init__(self, coroutine_function: Callable[..., Coroutine[Any, Any, Any]]):
        self.coroutine_function = coroutine_function
        self.slots: PerLoop[_TaskSlot] = PerLoop(_TaskSlot)

    def start(self, *args: Any) -> None:
        slot = self.slots.get()
        if slot.task is None or slot.task.done():
            loop = asyncio.get_running_loop()
            # Process-wide: not in the context of the socket that started it.
            slot.task = loop.create_task(
                self.coroutine_function(*args),
                context=logs.context_without_connection(),
            )

    async def stop(self) -> None:
        slot = self.slots.pop()
        if slot is not None and slot.task is not None:
            await cancel_and_wait(slot.task)


async def cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait until it has finished."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


class RoomTasks:
    """Short tasks started per room, kept once per event loop until they end.

    Each runs ``coroutine_function(room)``; an exception is logged, not lost.
    ``stop`` cancels those still running (tests, between two).
    """

    def __init__(
        self, coroutine_function: Callable[..., Coroutine[Any, Any, Any]], what: str
    ) -> None:
        self.coroutine_function = coroutine_function
        self.what = what
        self.running: PerLoop[set[asyncio.Task[Any]]] = PerLoop(set)

    def start(self, room: Any) -> None:
        running = self.running.get()
        task = asyncio.get_running_loop().create_task(
            self._run(room), context=logs.context_without_connection()
        )
        running.add(task)
        task.add_done_callback(running.discard)

    async def _run(self, room: Any) -> None:
        try:
            await self.coroutine_function(room)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s for %s failed", self.what, room)

    async def stop(self) -> None:
        for task in list(self.running.pop() or ()):
            await cancel_and_wait(task)
