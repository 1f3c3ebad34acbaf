"""Push events from server-side code to live sockets, on every server process.

Each function sends a ``push`` frame (``{"type": "push", "event": …, "data": …}``)
and returns how many live connections it reached. Call them from sync code as
they are; from async code, ``await`` them::

    push.to_user(user, "invoice.paid", {"id": 7})          # a view, a task
    await push.to_user(user, "invoice.paid", {"id": 7})    # a coroutine

An interface over the ``push_*`` services of ``chat.services``, which send.
Their type says both ways, ``int | Awaitable[int]``: typed async code that wants
a plain ``int`` awaits the ``services.push_*`` coroutines instead.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from asgiref.sync import async_to_sync

from chat import services

if TYPE_CHECKING:
    from django.contrib.auth.models import User

P = ParamSpec("P")
R = TypeVar("R")


def _sync_or_async(
    coroutine_function: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, R | Awaitable[R]]:
    """Run to completion in sync code; return the awaitable in async code."""

    @functools.wraps(coroutine_function)
    def call(*args: P.args, **kwargs: P.kwargs) -> R | Awaitable[R]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return async_to_sync(coroutine_function)(*args, **kwargs)
        return coroutine_function(*args, **kwargs)

    return call


@_sync_or_async
async def to_user(user: User | int, event: str, data: object) -> int:
    """Every live connection of ``user`` (a user object or id)."""
    user_id = cast(int, getattr(user, "pk", user))
    return await services.push_to_user(user_id=user_id, event=event, data=data)


@_sync_or_async
async def to_room(slug: str, event: str, data: object) -> int:
    """Every live connection that joined the room ``slug``."""
    return await services.push_to_room(slug=slug, event=event, data=data)


@_sync_or_async
async def to_connection(connection_id: str, event: str, data: object) -> int:
    """The one live connection whose ``hello`` carried ``connection_id``."""
    return await services.push_to_connection(
        connection_id=connection_id, event=event, data=data
    )


@_sync_or_async
async def to_everyone(event: str, data: object) -> int:
    """Every live connection."""
    return await services.push_to_everyone(event=event, data=data)
