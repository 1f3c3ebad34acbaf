"""Deliver frames to live sockets through the channel layer, once per process.

Each server process runs one ``Hub``. The hub owns a single channel-layer
channel and adds it to a group (``room.<id>``, ``user.<id>``) while at least one
of the process's sockets belongs there. A broadcast is one ``group_send`` of a
frame serialized once; every process that holds members gets it once and writes
the same bytes to each of its sockets. Channels consumers stay the interface
for connect, receive and disconnect; the channel layer stays the bus.
"""

import asyncio
import logging
import weakref

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from chat import protocol

logger = logging.getLogger(__name__)

_hubs: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub]" = (
    weakref.WeakKeyDictionary()
)


def room_group(room_id):
    return f"room.{room_id}"


def user_group(user_id):
    return f"user.{user_id}"


def room_groups(room):
    """The groups that reach everyone in ``room``.

    A direct conversation reaches both users on every socket, joined or not, so a
    new direct message shows up wherever they are.
    """
    if room.is_direct:
        return [user_group(uid) for uid in direct_room_user_ids(room)]
    return [room_group(room.pk)]


def direct_room_user_ids(room):
    """The two user ids encoded in a direct room's slug (``dm-<id>-<id>``)."""
    _, low, high = room.slug.split("-")
    return sorted({int(low), int(high)})


class Hub:
    """This process's end of the channel layer: groups → local sockets."""

    def __init__(self, layer):
        self.layer = layer
        self.channel_name = None
        self.members: dict[str, set] = {}
        self.connections: set = set()
        self._subscribed: set[str] = set()
        self._lock = asyncio.Lock()
        self._task = None

    async def start(self):
        self.channel_name = await self.layer.new_channel("hub.")
        self._task = asyncio.get_running_loop().create_task(self._receive_forever())

    async def stop(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def add(self, group, connection):
        self.members.setdefault(group, set()).add(connection)
        await self._sync(group)

    async def discard(self, group, connection):
        members = self.members.get(group)
        if members is not None:
            members.discard(connection)
            if not members:
                del self.members[group]
        await self._sync(group)

    def local_members(self, group):
        return self.members.get(group, ())

    async def _sync(self, group):
        # Group membership changes await Redis; the lock and the re-check make
        # concurrent add/discard of one group end in the state the sockets need.
        async with self._lock:
            wanted = group in self.members
            if wanted and group not in self._subscribed:
                await self.layer.group_add(group, self.channel_name)
                self._subscribed.add(group)
            elif not wanted and group in self._subscribed:
                await self.layer.group_discard(group, self.channel_name)
                self._subscribed.discard(group)

    async def refresh_subscriptions(self):
        """Re-add every group before the layer's group expiry forgets it."""
        async with self._lock:
            for group in list(self._subscribed):
                await self.layer.group_add(group, self.channel_name)

    async def _receive_forever(self):
        while True:
            try:
                event = await self.layer.receive(self.channel_name)
                await self.deliver(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("fan-out receive failed; continuing")
                await asyncio.sleep(0.1)

    async def deliver(self, event):
        encoded = protocol.Encoded(event["frame_type"], event["text"])
        exclude_user = event.get("exclude_user")
        for connection in list(self.members.get(event["group"], ())):
            if exclude_user is not None and connection.user_id == exclude_user:
                continue
            await connection.deliver(encoded)


async def get_hub():
    """The hub of the running event loop, started on first use."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = Hub(get_channel_layer())
        _hubs[loop] = hub
        await hub.start()
    return hub


async def stop_hub():
    """Stop the running loop's hub (tests start each with a fresh one)."""
    hub = _hubs.pop(asyncio.get_running_loop(), None)
    if hub is not None:
        await hub.stop()


async def publish(groups, frame, *, exclude_user=None):
    """Send ``frame`` to every live socket in ``groups``, on every process."""
    encoded = protocol.encode(frame)
    event = {
        "type": "hub.frame",
        "frame_type": encoded.type,
        "text": encoded.text,
        "exclude_user": exclude_user,
    }
    layer = get_channel_layer()
    for group in groups:
        await layer.group_send(group, {**event, "group": group})


def publish_sync(groups, frame, *, exclude_user=None):
    """``publish`` for sync code: services, views, commands."""
    async_to_sync(publish)(groups, frame, exclude_user=exclude_user)
