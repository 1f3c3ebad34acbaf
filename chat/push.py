"""Push events from server-side code to live sockets, on every server process.

Each function sends a ``push`` frame (``{"type": "push", "event": …, "data": …}``)
and returns how many live connections it reached. Call them from sync code as
they are; from async code, ``await`` them::

    push.to_user(user, "invoice.paid", {"id": 7})          # a view, a task
    await push.to_user(user, "invoice.paid", {"id": 7})    # a coroutine
"""

import asyncio
import functools
import logging

from asgiref.sync import async_to_sync

from chat import fanout, presence, protocol

logger = logging.getLogger(__name__)


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


async def _push(groups, event, data, count, *, match=None):
    frame = protocol.push(event=event, data=data)
    await fanout.publish(groups, frame, match=match)
    logger.info("push %r reached %d connection(s)", event, count)
    return count


@_sync_or_async
async def to_user(user, event, data):
    """Every live connection of ``user`` (a user object or id)."""
    user_id = getattr(user, "pk", user)
    count = await presence.live_count(user_id=user_id)
    return await _push([fanout.user_group(user_id)], event, data, count)


@_sync_or_async
async def to_room(slug, event, data):
    """Every live connection that joined the room ``slug``."""
    from chat import selectors

    room = await selectors.room_get_async(slug=slug)
    count = await presence.live_count(room_id=room.pk)
    groups = fanout.room_groups(room)
    return await _push(groups, event, data, count, match={"room": room.slug})


@_sync_or_async
async def to_connection(connection_id, event, data):
    """The one live connection whose ``hello`` carried ``connection_id``."""
    count = await presence.live_count(connection_id=connection_id)
    group = fanout.connection_group(connection_id)
    match = {"connection_id": connection_id}
    return await _push([group], event, data, count, match=match)


@_sync_or_async
async def to_everyone(event, data):
    """Every live connection."""
    count = await presence.live_count()
    return await _push([fanout.EVERYONE_GROUP], event, data, count)
