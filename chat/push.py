"""Push events from server-side code to live sockets, on every server process.

Each function sends a ``push`` frame (``{"type": "push", "event": …, "data": …}``)
and returns how many live connections it reached. Call them from sync code as
they are; from async code, ``await`` them::

    push.to_user(user, "invoice.paid", {"id": 7})          # a view, a task
    await push.to_user(user, "invoice.paid", {"id": 7})    # a coroutine

An interface over the ``push_*`` services of ``chat.services``, which send.
"""

import asyncio
import functools

from asgiref.sync import async_to_sync

from chat import services


def _sync_or_async(coroutine_function):
    """Run to completion in sync code; return the awaitable in async code."""

    @functools.wraps(coroutine_function)
    def call(*args, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return async_to_sync(coroutine_function)(*args, **kwargs)
        return coroutine_function(*args, **kwargs)

    return call


@_sync_or_async
async def to_user(user, event, data):
    """Every live connection of ``user`` (a user object or id)."""
    user_id = getattr(user, "pk", user)
    return await services.push_to_user(user_id=user_id, event=event, data=data)


@_sync_or_async
async def to_room(slug, event, data):
    """Every live connection that joined the room ``slug``."""
    return await services.push_to_room(slug=slug, event=event, data=data)


@_sync_or_async
async def to_connection(connection_id, event, data):
    """The one live connection whose ``hello`` carried ``connection_id``."""
    return await services.push_to_connection(
        connection_id=connection_id, event=event, data=data
    )


@_sync_or_async
async def to_everyone(event, data):
    """Every live connection."""
    return await services.push_to_everyone(event=event, data=data)
