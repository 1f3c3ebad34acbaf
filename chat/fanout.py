"""Deliver frames to live sockets through the channel layer, once per process.

Each server process runs one ``Hub``. The hub owns a single channel-layer
channel and adds it to a group (``room.<id>``, ``user.<id>``) while at least one
of the process's sockets belongs there. A broadcast is one ``group_send`` of a
frame serialized once; every process that holds members gets it once and writes
the same bytes to each of its sockets. Channels consumers stay the interface
for connect, receive and disconnect; the channel layer stays the bus.

This module is the transport only: ``chat.services`` declares what to send as
``Delivery`` and ``Batch`` values and is the one caller of ``publish``,
``command`` and ``publish_many``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Required, TypedDict, final

from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings

from chat import logs, metrics, protocol, serving
from chat.loops import PerLoop, cancel_and_wait

if TYPE_CHECKING:
    from chat.consumers import ChatConsumer
    from chat.models import Room

logger = logging.getLogger(__name__)


# Unique per server process; connection ids start with it, so a frame for one
# connection goes to its process's group.
PROCESS_ID = secrets.token_hex(4)

EVERYONE_GROUP = "everyone"

# At most this many layer messages per receive: a hub that fell behind writes
# what piled up to each socket in one system call (see Hub.deliver).
RECEIVE_BATCH = 64


def process_group(process_id: str = PROCESS_ID) -> str:
    return f"process.{process_id}"


def connection_group(connection_id: str) -> str:
    """The group of the process that holds ``connection_id``."""
    return process_group(connection_id.rsplit("-", 1)[0])


def room_group(room_id: int) -> str:
    return f"room.{room_id}"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def room_groups(room: Room) -> list[str]:
    """The groups that reach everyone in ``room``.

    A direct conversation reaches both users on every socket, joined or not, so a
    new direct message shows up wherever they are.
    """
    if room.is_direct:
        return [user_group(uid) for uid in direct_room_user_ids(room)]
    return [room_group(room.pk)]


def direct_room_user_ids(room: Room) -> list[int]:
    """The two user ids encoded in a direct room's slug (``dm-<id>-<id>``)."""
    _, low, high = room.slug.split("-")
    return sorted({int(low), int(high)})


class CloseOrder(TypedDict):
    """Close the socket with ``code`` and ``reason``."""

    action: Literal["close"]
    code: int
    reason: str


class RemoveOrder(TypedDict):
    """Take the socket out of the room ``room``; it gets a ``removed`` frame."""

    action: Literal["remove"]
    room: str
    reason: str


# An order for a socket itself, carried out by ``ChatConsumer.control``.
Order = CloseOrder | RemoveOrder


class Match(TypedDict, total=False):
    """Conditions a socket must fit to get an event (see ``ChatConsumer.matches``).

    ``room``: it joined the room of that slug; ``not_connection_id``: it is not
    that connection; any other key: the socket's attribute of that name equals it.
    """

    room: str
    connection_id: str
    not_connection_id: str
    device: str
    token_id: int
    auth: str
    session: str


# Frames for many groups: (groups, frames) pairs; on the layer, (group, [(type,
# text), ...]) pairs (lists once msgpack has carried them through Redis).
Broadcasts = tuple[tuple[tuple[str, ...], tuple[protocol.ServerFrame, ...]], ...]
EncodedBatch = Sequence[tuple[str, str]]


@final
class GroupEvent(TypedDict, total=False):
    """A frame (``text``) or an order (``control``) for the sockets of ``group``."""

    type: Required[str]
    group: str  # added per group as it is sent
    frame_type: str
    text: str
    control: Order
    exclude_user: int | None
    match: Match | None
    presence_version: int  # see Delivery


@final
class MultiEvent(TypedDict):
    """Frames for many groups in one message to every process (``publish_many``)."""

    type: str
    group: None
    multi: Sequence[tuple[str, EncodedBatch]]
    sent_at: float  # time.time() of the broadcast, after commit (metrics)


# A layer message for the hubs (``type`` ``hub.frame``), see ``Hub.deliver``.
HubEvent = GroupEvent | MultiEvent


@dataclass(frozen=True)
class Delivery:
    """One event for the layer: a ``frame`` or an ``order``, to ``groups``.

    ``exclude_user`` skips a user's sockets and ``match`` narrows the groups to
    the sockets whose attributes match (see ``Hub.deliver``). A ``presence``
    frame of a room's group carries the room's ``presence_version`` after the
    change: a socket whose ``joined`` was at that version or later has the
    change already and skips it (``ChatConsumer.presence_floors``).
    """

    groups: tuple[str, ...]
    frame: protocol.ServerFrame | None = None
    order: Order | None = None
    exclude_user: int | None = None
    match: Match | None = None
    presence_version: int | None = None


@dataclass(frozen=True)
class Batch:
    """Frames for many groups as a single layer message (see ``publish_many``).

    ``broadcasts`` holds (groups, frames) pairs, both tuples.
    """

    broadcasts: Broadcasts


# What services emit: sent after commit (``services._emit``) or at once.
Event = Delivery | Batch


class Hub:
    """This process's end of the channel layer: groups → local sockets."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer
        self.channel_name: str | None = None
        # group -> this process's sockets in it
        self.members: dict[str, set[ChatConsumer]] = {}
        # every open socket of this process (the presence keeper vouches for them)
        self.connections: set[ChatConsumer] = set()
        self._subscribed: set[str] = set()
        self.groups_refreshed_at = time.monotonic()
        # group -> sockets joining it -> the events that came for it meanwhile
        # (see hold)
        self.holding: dict[str, dict[ChatConsumer, list[HubEvent]]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Start receiving, once; later calls wait until it has started."""
        if self._started is None:
            # The hub serves every socket: not the context of the one that
            # happened to start it (its log lines would name that socket).
            self._started = asyncio.get_running_loop().create_task(
                self._start(), context=logs.context_without_connection()
            )
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        self.channel_name = await self.layer.new_channel("hub.")
        self._task = asyncio.get_running_loop().create_task(self._receive_forever())
        if settings.CHAT_CLOSE_ON_SIGTERM:
            from chat import policies

            policies.install_shutdown_handler(self)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def add(self, group: str, connection: ChatConsumer) -> None:
        self.members.setdefault(group, set()).add(connection)
        await self._sync(group)

    async def discard(self, group: str, connection: ChatConsumer) -> None:
        members = self.members.get(group)
        if members is not None:
            members.discard(connection)
            if not members:
                del self.members[group]
        await self._sync(group)

    async def hold(self, group: str, connection: ChatConsumer) -> None:
        """Listen to ``group`` for ``connection`` without delivering to it yet.

        What comes for the group meanwhile is kept for it: ``release`` hands it
        over once the socket may have it (a join checked), or drops it.
        """
        self.holding.setdefault(group, {})[connection] = []
        await self._sync(group)

    async def release(
        self, group: str, connection: ChatConsumer, *, keep: bool
    ) -> None:
        """Stop holding ``group`` for ``connection``.

        With ``keep`` the socket gets what was kept, in order, and becomes a
        member; without, what was kept is dropped.
        """
        kept = self.holding.get(group, {}).get(connection, [])
        while keep and kept:
            # Until the list is empty, newer events keep joining it: nothing
            # overtakes what waits.
            event = kept.pop(0)
            await self._deliver_to(event, group, connection)
        holders = self.holding.get(group, {})
        holders.pop(connection, None)
        if not holders:
            self.holding.pop(group, None)
        if keep:
            self.members.setdefault(group, set()).add(connection)
        await self._sync(group)

    async def _deliver_to(
        self, event: HubEvent, group: str, connection: ChatConsumer
    ) -> None:
        """What of ``event`` is for ``group``, to ``connection`` alone."""
        if "multi" in event:
            frames = [
                protocol.Encoded(kind, text)
                for part_group, batch in event["multi"]
                if part_group == group
                for kind, text in batch
            ]
            for encoded in frames:
                metrics.frames_out_add(encoded.type)
            await self._write_plan({connection: frames} if frames else {})
        elif self._targets(event, [connection]):
            if "text" in event:
                encoded = protocol.Encoded(event["frame_type"], event["text"])
                metrics.frames_out_add(encoded.type)
                await self._write_plan({connection: [encoded]})
            else:
                await connection.control(event["control"])

    def _hold(self, event: HubEvent) -> None:
        if "multi" in event:
            groups = {group for group, _ in event["multi"]}
        else:
            groups = {event["group"]}
        for group in groups & self.holding.keys():
            for kept in self.holding[group].values():
                kept.append(event)

    def local_members(self, group: str) -> Collection[ChatConsumer]:
        return self.members.get(group, ())

    async def _sync(self, group: str) -> None:
        # Group membership changes await Redis; the lock and the re-check make
        # concurrent add/discard of one group end in the state the sockets need.
        async with self._lock:
            wanted = group in self.members or group in self.holding
            if wanted and group not in self._subscribed:
                await self.layer.group_add(group, self.channel_name)
                self._subscribed.add(group)
            elif not wanted and group in self._subscribed:
                await self.layer.group_discard(group, self.channel_name)
                self._subscribed.discard(group)

    async def refresh_subscriptions(self) -> None:
        """Re-add every group before the layer's group expiry forgets it."""
        self.groups_refreshed_at = time.monotonic()
        async with self._lock:
            # The groups that carry stored messages and orders come back first.
            groups = sorted(self._subscribed, key=lambda g: g.startswith("room."))
            for group in groups:
                await self.layer.group_add(group, self.channel_name)

    async def _receive_forever(self) -> None:
        failures = 0
        receive_many = getattr(self.layer, "receive_many", None)
        while True:
            try:
                if receive_many is not None:
                    events = await receive_many(self.channel_name, RECEIVE_BATCH)
                else:
                    events = [await self.layer.receive(self.channel_name)]
            except asyncio.CancelledError:
                raise
            except Exception:
                # Redis out of reach: say so once, then retry quietly, a little
                # slower each time (0.1 s up to 1 s), until it answers again.
                if failures == 0:
                    logger.exception("fan-out receive failed; retrying")
                failures += 1
                await asyncio.sleep(min(0.1 * failures, 1.0))
                continue
            if failures:
                logger.warning("fan-out receive works again after %d tries", failures)
                failures = 0
            try:
                await self.deliver(*events)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("fan-out delivery failed; continuing")

    async def deliver(self, *events: HubEvent) -> None:
        """Hand layer events to the matching local sockets, in order.

        ``multi`` carries (group, frames) pairs for many groups at once. Else
        ``exclude_user`` skips a user's sockets and ``match`` narrows the group
        to the sockets whose attributes match (see ``ChatConsumer.matches``);
        ``text`` is a frame to send, ``control`` an order for the socket itself
        (close, leave a room).

        What one socket gets from all of ``events`` goes out in one system call:
        the frames are planned per socket first and written after, sockets
        getting the same frames sharing their joined bytes. An order is carried
        out where it stands, after the frames planned before it are written.
        """
        plan: dict[ChatConsumer, list[protocol.Encoded]] = {}
        sent_at: list[float] = []  # of the stored messages' broadcasts planned
        for event in events:
            if self.holding:
                self._hold(event)
            if "multi" in event:
                planned = False
                for group, batch in event["multi"]:
                    members = self.members.get(group)
                    if members:
                        frames = [protocol.Encoded(k, text) for k, text in batch]
                        for connection in members:
                            plan.setdefault(connection, []).extend(frames)
                        for encoded in frames:
                            metrics.frames_out_add(encoded.type, len(members))
                        planned = True
                if planned and "sent_at" in event:
                    sent_at.append(event["sent_at"])
            elif "text" in event:
                encoded = protocol.Encoded(event["frame_type"], event["text"])
                targets = self._targets(event)
                for connection in targets:
                    plan.setdefault(connection, []).append(encoded)
                metrics.frames_out_add(encoded.type, len(targets))
            else:
                await self._write_plan(plan)
                plan = {}
                for connection in self._targets(event):
                    await connection.control(event["control"])
        await self._write_plan(plan)
        if sent_at:
            now = time.time()
            for at in sent_at:
                metrics.delivery_seconds.observe(now - at)

    def _targets(
        self, event: GroupEvent, connections: Collection[ChatConsumer] | None = None
    ) -> list[ChatConsumer]:
        """The sockets here (or of ``connections``) that ``event`` is for."""
        group = event["group"]
        if connections is None:
            connections = self.members.get(group, ())
        exclude_user = event.get("exclude_user")
        match = event.get("match")
        version = event.get("presence_version")
        if exclude_user is None and not match and version is None:
            return list(connections)
        return [
            connection
            for connection in connections
            if (exclude_user is None or connection.user_id != exclude_user)
            and (not match or connection.matches(match))
            and (version is None or connection.presence_floors.get(group, 0) < version)
        ]

    async def _write_plan(
        self, plan: dict[ChatConsumer, list[protocol.Encoded]]
    ) -> None:
        # Sockets getting the same frames (a room's members) share one Frames,
        # so the bytes are joined once per framing, not once per socket.
        shared: dict[tuple[int, ...], serving.Frames] = {}
        for connection, frames in plan.items():
            key = tuple(map(id, frames))
            together = shared.get(key)
            if together is None:
                together = shared[key] = serving.Frames(frames)
            # One system call for all of them, without a coroutine per socket,
            # whenever the socket allows.
            if not connection.write_now(together):
                for encoded in frames:
                    await connection.deliver(encoded)


_hubs: PerLoop[Hub] = PerLoop(lambda: Hub(get_channel_layer()))

# The layer forgets a group it was not told of again within its group expiry
# (a day by default): the hub re-adds its groups this often, or at a quarter of
# that expiry if it is shorter. The presence keeper calls the upkeep.
GROUPS_REFRESH_SECONDS = 3 * 3600.0


async def groups_upkeep(hub: Hub) -> None:
    """Re-add the hub's layer groups when they are due."""
    expiry = getattr(hub.layer, "group_expiry", None)
    every = (
        GROUPS_REFRESH_SECONDS
        if expiry is None
        else min(GROUPS_REFRESH_SECONDS, expiry / 4)
    )
    if time.monotonic() - hub.groups_refreshed_at >= every:
        await hub.refresh_subscriptions()


async def groups_restore(hub: Hub) -> None:
    """Put the hub's layer groups back now: Redis lost its data."""
    await hub.refresh_subscriptions()


async def get_hub() -> Hub:
    """The hub of the running event loop, started on first use."""
    hub = _hubs.get()
    await hub.start()
    return hub


async def stop_hub() -> None:
    """Stop the running loop's hub (tests start each with a fresh one)."""
    hub = _hubs.pop()
    if hub is not None:
        await hub.stop()


async def publish(
    groups: Iterable[str],
    frame: protocol.ServerFrame,
    *,
    exclude_user: int | None = None,
    match: Match | None = None,
    presence_version: int | None = None,
) -> None:
    """Send ``frame`` to every live socket in ``groups``, on every process."""
    encoded = protocol.encode(frame)
    event: GroupEvent = {
        "type": "hub.frame",
        "frame_type": encoded.type,
        "text": encoded.text,
        "exclude_user": exclude_user,
        "match": match,
    }
    if presence_version is not None:
        event["presence_version"] = presence_version
    await _group_send_each(groups, event)


async def command(
    groups: Iterable[str], control: Order, *, match: Match | None = None
) -> None:
    """Give the matching sockets in ``groups`` an order: ``{"action": …}``."""
    event: GroupEvent = {"type": "hub.frame", "control": control, "match": match}
    await _group_send_each(groups, event)


async def _group_send_each(groups: Iterable[str], event: GroupEvent) -> None:
    layer = get_channel_layer()
    async with _layer_slot():
        for group in groups:
            await layer.group_send(group, {**event, "group": group})


# channels-redis takes a pooled Redis connection per call, and redis-py's pool
# raises past 100 connections instead of waiting: bound the calls in flight.
LAYER_CALLS_IN_FLIGHT = 48
_slots: PerLoop[asyncio.Semaphore] = PerLoop(
    lambda: asyncio.Semaphore(LAYER_CALLS_IN_FLIGHT)
)


def _layer_slot() -> asyncio.Semaphore:
    return _slots.get()


async def publish_many(broadcasts: Broadcasts) -> None:
    """Send several (groups, frames) broadcasts as a single layer message.

    The message goes to every process with live sockets (the ``everyone``
    group), and each hub hands each group's frames to its own members of that
    group. One store batch touching many rooms then costs one layer round trip,
    not one per room.
    """
    parts: list[tuple[str, EncodedBatch]] = []
    for groups, frames in broadcasts:
        batch = [(e.type, e.text) for e in map(protocol.encode, frames)]
        parts.extend((group, batch) for group in groups)
    event: MultiEvent = {
        "type": "hub.frame",
        "multi": parts,
        "group": None,
        "sent_at": time.time(),
    }
    async with _layer_slot():
        await get_channel_layer().group_send(EVERYONE_GROUP, event)
