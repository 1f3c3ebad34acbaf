"""The WebSocket interface at ``/ws/``: decode a frame, call a service, reply."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from chat import (
    fanout,
    logs,
    metrics,
    policies,
    presence,
    protocol,
    registry,
    selectors,
    services,
    serving,
    throttle,
    writer,
)
from chat.protocol import BAD_REQUEST, NOT_JOINED, ChatError

if TYPE_CHECKING:
    from autobahn.twisted.websocket import WebSocketServerProtocol
    from django.contrib.auth.models import User

    from chat.application import Receive, Scope, Send
    from chat.models import Room

logger = logging.getLogger(__name__)

# Connection ids are unique across processes: the process id and a counter.
_counter = itertools.count(1)
MAX_DEVICE_CHARS = 64
# Sends of one socket waiting for their commit before it stops reading frames.
MAX_SENDS_IN_FLIGHT = 64
# Seconds a recovery waits for a client that reads nothing before 1008.
SLOW_READER_SECONDS = 30

db = database_sync_to_async

# slug -> the room's layer group, for the rooms joined on this process (see
# ChatConsumer._listen_and_join); forgotten all at once past this many.
_room_groups: dict[str, str] = {}
ROOM_GROUPS_KEPT = 10_000


def choose_subprotocol(offered: Iterable[str]) -> str | None:
    """The first subprotocol the client offered that we speak, or None."""
    for name in offered:
        if name in (protocol.SUBPROTOCOL_JSON, protocol.SUBPROTOCOL_BINARY):
            return name
    return None


class ChatConsumer(AsyncWebsocketConsumer):
    # None until connect() and again after disconnect(); set for every frame.
    hub: fanout.Hub | None = None
    # The daphne socket frames are written to directly (see chat.serving).
    wire: WebSocketServerProtocol | None = None
    # Frames the client has not read yet, under daphne (see chat.serving).
    send_buffer: serving.SendBuffer | None = None
    # Writing out what waits in send_buffer, once the client reads again.
    draining: asyncio.Task[None] | None = None
    # Set when nothing waits in send_buffer any more (see _until_written).
    written: asyncio.Event | None = None
    closing = False

    # Set by connect().
    user: User
    user_id: int
    username: str
    connection_id: str
    connected_at: str
    token_id: int | None
    auth: str  # "token" or "session"
    # services.session_fingerprint of the session that opened it; None (the
    # class's) for token sockets, which then hold no attribute for it.
    session: str | None = None
    device: str | None
    rooms: dict[str, Room]  # slug -> Room this socket joined
    # room group -> the presence version its joined frame was at: the hub skips
    # presence frames of changes up to it (see fanout.Delivery). The class's
    # empty one until the socket joins a room.
    presence_floors: Mapping[str, int] = MappingProxyType({})
    sends_in_flight: set[asyncio.Task[None]]
    last_seen: float  # time.monotonic() of the last frame received
    opened_at: float  # time.monotonic() at connect
    rate_limits: throttle.SocketThrottle
    binary: bool  # chat.v1.bin framing
    # protocol.framing: the subprotocol's, and ?compress=gzip
    framing: int

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections before every handler, a
        # thread-pool round trip per frame. Every database call here runs in
        # database_sync_to_async, which does that itself: skip it.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One socket, one loop. Channels' version also waits on a channel-layer
        # channel of the socket's own, through a task per socket; here the
        # process's fan-out hub receives for every socket (see chat.fanout).
        # chat.application has checked the user before this runs.
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            # However the socket ends (a handler raised, even while answering an
            # error; the task was cancelled), it leaves no ghost behind: not in
            # presence, the live-connection registry or the hub. The ASGI server
            # closes with 1011 when this raises, and calls no disconnect itself.
            await self.disconnect(protocol.CLOSE_SERVER_ERROR)

    async def connect(self) -> None:
        user = self.scope["user"]
        self.user = user
        self.user_id = user.pk
        self.username = user.get_username()
        self.connection_id = f"{fanout.PROCESS_ID}-{next(_counter)}"
        # Every line logged while this socket's frames are handled names it.
        logs.bind_connection(self.connection_id, self.username)
        # A datetime in, a str out (timestamp only answers None for None).
        self.connected_at = cast(str, protocol.timestamp(timezone.now()))
        self.token_id = self.scope.get("token_id")
        self.auth = "token" if self.token_id is not None else "session"
        if self.scope.get("session") is not None:
            self.session = self.scope["session"]
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        self.device = (query.get("device") or [""])[0][:MAX_DEVICE_CHARS] or None
        self.rooms = {}
        self.sends_in_flight = set()
        self.last_seen = self.opened_at = time.monotonic()
        self.rate_limits = throttle.SocketThrottle(user_id=self.user_id)
        subprotocol = choose_subprotocol(self.scope.get("subprotocols", []))
        self.binary = subprotocol == protocol.SUBPROTOCOL_BINARY
        # Any other value of compress (or none) leaves frames uncompressed.
        gzip = (query.get("compress") or [""])[0] == "gzip"
        self.framing = protocol.framing(binary=self.binary, gzip=gzip)
        await self.accept(subprotocol)
        self.wire = serving.daphne_wire(self.base_send)
        if self.wire is not None:
            serving.release_handshake(self.wire)
        socket = serving.daphne_socket(self.base_send)
        if socket is not None and settings.CHAT_SEND_BUFFER_BYTES:
            self.send_buffer = serving.SendBuffer(
                socket,
                limit=settings.CHAT_SEND_BUFFER_BYTES,
                resume=self._resume_sending,
            )
        self.hub = await fanout.get_hub()
        presence.start_keeper(self.hub)
        policies.start_idle_watch(self.hub)
        self.hub.connections.add(self)
        metrics.connections.inc()
        live = await registry.connection_register(self.info())
        refusal = await policies.connection_refusal(
            user_id=self.user_id,
            connection_id=self.connection_id,
            device=self.device,
            live=live,
        )
        if refusal is not None:
            await self.close_with(protocol.CLOSE_TRY_AGAIN, refusal)
            # Forgotten now, not when the client's close arrives: until then it
            # would count against the user's next sockets.
            await self.disconnect(protocol.CLOSE_TRY_AGAIN)
            return
        for group in self._own_groups():
            await self.hub.add(group, self)
        if self.device is not None:
            await self._replace_older_device_connections(self.device)
        await self.send_frame(
            protocol.hello(
                connection_id=self.connection_id,
                user=user,
                heartbeat=settings.CHAT_HEARTBEAT,
            )
        )
        # The connection log: one line when a socket opens, one when it closes.
        logger.info(
            "socket open: %s, %s%s%s",
            self.auth,
            subprotocol or protocol.SUBPROTOCOL_JSON,
            ", gzip" if self.framing >= protocol.FRAMING_JSON_GZIP else "",
            f", device {self.device}" if self.device else "",
        )

    def _own_groups(self) -> list[str]:
        return [
            fanout.user_group(self.user_id),
            fanout.process_group(),
            fanout.EVERYONE_GROUP,
        ]

    async def _replace_older_device_connections(self, device: str) -> None:
        await services.device_connections_replace(
            user_id=self.user_id, device=device, connection_id=self.connection_id
        )

    def info(self) -> registry.ConnectionInfo:
        """What the live-connection registry knows of this socket."""
        return {
            "id": self.connection_id,
            "user_id": self.user_id,
            "username": self.username,
            "process": fanout.PROCESS_ID,
            "connected_at": self.connected_at,
            "device": self.device,
            "rooms": list(self.rooms),
        }

    def matches(self, match: fanout.Match) -> bool:
        """Whether this socket fits every condition of a hub event's ``match``."""
        for key, value in match.items():
            if key == "room":
                fits = value in self.rooms
            elif key == "not_connection_id":
                fits = self.connection_id != value
            else:
                fits = getattr(self, key, None) == value
            if not fits:
                return False
        return True

    async def control(self, order: fanout.Order) -> None:
        """Carry out an order from the hub: close, or leave a room."""
        if order["action"] == "close":
            await self.close_with(order["code"], order.get("reason", ""))
        elif order["action"] == "remove":
            room = self.rooms.get(order["room"])
            if room is not None:
                await self._exit_room(room)
                frame = protocol.removed(room_slug=room.slug, reason=order["reason"])
                await self.send_frame(frame)

    async def close_with(self, code: int, reason: str = "") -> None:
        if not self.closing:
            self.closing = True
            await self.close(code=code, reason=reason)

    async def disconnect(self, code: int) -> None:
        if self.hub is None:
            return
        # First, so the presence keeper stops vouching for this socket even if
        # Redis fails below.
        if self in self.hub.connections:
            self.hub.connections.discard(self)
            metrics.connections.dec()
            metrics.closed(code)
            logger.info(
                "socket closed: code %s after %.1f s in %d rooms",
                code,
                time.monotonic() - self.opened_at,
                len(self.rooms),
            )
        self.closing = True
        for room in list(self.rooms.values()):
            try:
                await self._exit_room(room)
            except Exception:
                logger.exception("leaving %s on disconnect failed", room.slug)
        try:
            for group in self._own_groups():
                await self.hub.discard(group, self)
            await registry.connection_unregister(self)
        except Exception:
            logger.exception("forgetting the socket on disconnect failed")
        self.hub = None
        if self.written is not None:
            self.written.set()  # a recovery waiting for the client stops

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        self.last_seen = time.monotonic()
        size = (
            len(bytes_data)
            if bytes_data is not None
            # Channels passes exactly one of the two: text_data is set here.
            else len(text_data.encode())  # type: ignore[union-attr]
        )
        if size > protocol.MAX_FRAME_BYTES:
            await self.close(code=protocol.CLOSE_TOO_BIG)
            return
        ref = None
        try:
            frame = self._parse(text_data, bytes_data)
            metrics.frame_in(frame.type)
            ref = frame.ref
            await self.rate_limits.check(frame.type)
            await getattr(self, f"on_{frame.type}")(frame)
        except ChatError as exc:
            await self.send_frame(protocol.error_from(exc, ref=ref))
            if self.rate_limits.exhausted:
                await self.close_with(
                    protocol.CLOSE_POLICY,
                    f"rate limit: {throttle.STRIKES_BEFORE_CLOSE} frames refused "
                    "in a row",
                )
        except services.DATABASE_OUTAGE_ERRORS as exc:
            logger.warning(
                "frame from %s: database unavailable: %s", self.connection_id, exc
            )
            outage = services.database_outage_error(exc)
            assert outage is not None
            await self.send_frame(protocol.error_from(outage, ref=ref))
        except Exception:
            logger.exception("frame from %s failed", self.connection_id)
            await self.close_with(protocol.CLOSE_SERVER_ERROR, "server error")
            raise  # __call__ cleans up

    def _parse(
        self, text_data: str | None, bytes_data: bytes | None
    ) -> protocol.ClientFrame:
        if self.binary:
            if bytes_data is None:
                raise ChatError(BAD_REQUEST, "chat.v1.bin takes binary frames only")
            return protocol.parse_binary(bytes_data)
        if text_data is None:
            raise ChatError(BAD_REQUEST, "chat.v1 takes JSON text frames only")
        return protocol.parse_json(text_data)

    # --- sending -------------------------------------------------------------

    async def send_frame(self, frame: protocol.ServerFrame) -> None:
        encoded = protocol.encode(frame)
        metrics.frames_out_add(encoded.type)
        if isinstance(frame, protocol.Error):
            metrics.error_sent(frame.code)
        await self.deliver(encoded)

    async def deliver(self, encoded: protocol.Encoded) -> None:
        """Write an already-encoded frame to this socket (the hub calls this).

        When the client reads too slowly for Twisted, the frame waits in the
        send buffer; past ``CHAT_SEND_BUFFER_BYTES`` the socket closes with 1008.
        """
        if self.closing:
            return
        buffer = self.send_buffer
        if buffer is not None and (buffer.paused or buffer.frames):
            if not buffer.hold(encoded, serving.frame_size(encoded, self.framing)):
                await self._close_slow_reader(buffer)
            return
        await self._write(encoded)

    def write_now(self, frames: serving.Frames) -> bool:
        """Write ``frames`` without awaiting, in one system call, if it can.

        The hub's fast path: True when they are written (or the socket is
        closing, and they are dropped as ``deliver`` would); False when they
        must go through ``deliver``, one by one (a plain ASGI socket, or one
        whose client reads too slowly and has frames waiting).
        """
        if self.closing:
            return True
        wire = self.wire
        if wire is None:
            return False
        buffer = self.send_buffer
        if buffer is not None and (buffer.paused or buffer.frames):
            return False
        if wire.state == wire.STATE_OPEN:
            serving.write_bytes(wire, frames.payload(self.framing))
        return True

    async def _write(self, encoded: protocol.Encoded) -> None:
        wire = self.wire
        if wire is not None:
            if wire.state == wire.STATE_OPEN:
                serving.write_prepared(wire, serving.prepared(encoded, self.framing))
            return
        payload, binary = encoded.wire(self.framing)
        if binary:
            await self.send(bytes_data=payload)
        else:
            await self.send(text_data=payload.decode())

    def _resume_sending(self) -> None:
        # Twisted calls this, in the loop's thread, when the client has read.
        buffer = self.send_buffer
        if buffer is not None and buffer.frames:
            if self.draining is None or self.draining.done():
                self.draining = asyncio.get_running_loop().create_task(self._drain())
        elif self.written is not None:
            self.written.set()

    async def _drain(self) -> None:
        buffer = self.send_buffer
        while buffer is not None and not self.closing:
            encoded = buffer.take()
            if encoded is None:
                break
            await self._write(encoded)
        if buffer is not None and not (buffer.paused or buffer.frames):
            if self.written is not None:
                self.written.set()

    async def _until_written(self) -> None:
        """Wait until the client has read what waits for it (back-pressure).

        For a burst the socket's own request asks for (a recovery), so that it
        goes out at the client's pace instead of filling the send buffer. A
        client that reads nothing for ``SLOW_READER_SECONDS`` is closed with 1008.
        """
        buffer = self.send_buffer
        while buffer is not None and not self.closing:
            if not (buffer.paused or buffer.frames):
                return
            self.written = asyncio.Event()
            try:
                await asyncio.wait_for(self.written.wait(), SLOW_READER_SECONDS)
            except TimeoutError:
                await self._close_slow_reader(buffer)

    async def _close_slow_reader(self, buffer: serving.SendBuffer) -> None:
        waiting = buffer.waiting
        buffer.release()
        logger.info(
            "closing %s with 1008: %d bytes waiting for the client to read",
            self.connection_id,
            waiting,
        )
        await self.close_with(
            protocol.CLOSE_POLICY,
            "too slow: more than CHAT_SEND_BUFFER_BYTES waiting to be read",
        )

    def joined_room_ids(self) -> list[int]:
        return [room.pk for room in self.rooms.values()]

    # --- frames ----------------------------------------------------------------

    def _joined_room(
        self,
        frame: protocol.Leave
        | protocol.Send
        | protocol.Typing
        | protocol.Edit
        | protocol.Delete
        | protocol.Read
        | protocol.React,
    ) -> Room:
        room = self.rooms.get(frame.room)
        if room is None:
            raise ChatError(NOT_JOINED, f"join room {frame.room!r} first")
        return room

    async def on_join(self, frame: protocol.Join) -> None:
        slug = frame.room
        if slug in self.rooms:
            # Joined already: a fresh look at the room (its last_seq) and who
            # is online; the socket listens to it already.
            room, state = await db(services.room_join)(slug=slug, user=self.user)
            self.rooms[slug] = room
            online, online_count = await presence.room_online(room)
            await self._send_joined(room, online, online_count, state, frame)
        else:
            room, state, held = await self._listen_and_join(slug)
            self.rooms[slug] = room
            try:
                online, online_count, version = await services.room_presence_enter(
                    room=room,
                    connection_id=self.connection_id,
                    user=self.user,
                    rooms=list(self.rooms),
                )
                if held is not None:
                    self.presence_floors = {**self.presence_floors, held: version}
                await self._send_joined(room, online, online_count, state, frame)
            finally:
                if held is not None:
                    # What came for the room meanwhile follows the joined frame,
                    # less the presence changes that frame has.
                    assert self.hub is not None  # connect() set it
                    await self.hub.release(held, self, keep=True)
        since = frame.since
        if since is not None:
            await self._recover(room, since)

    async def _send_joined(
        self,
        room: Room,
        online: list[str],
        online_count: int,
        state: selectors.ReadState,
        frame: protocol.Join,
    ) -> None:
        await self.send_frame(
            protocol.joined(
                room=room,
                online=online,
                online_count=online_count,
                read_seq=state.read_seq,
                unread=state.unread(room.last_seq),
                mentions=state.mentions,
                ref=frame.ref,
            )
        )

    async def _listen_and_join(
        self, slug: str
    ) -> tuple[Room, selectors.ReadState, str | None]:
        """Check the join and read the room, listening to it since before the read.

        So that nothing stored after the read of ``last_seq`` can be missed, the
        socket listens to the room's group before it: ``Hub.hold`` keeps what
        comes meanwhile until the socket has its ``joined`` frame. The group is
        known from an earlier join of the room on this process; the first join
        (or a slug that now names another room) reads twice. Answers the room,
        the read marker and the group held for the socket (None for a direct
        room, whose users' groups reach the socket): the caller releases it.
        """
        assert self.hub is not None  # connect() set it, before any frame
        known = _room_groups.get(slug)
        if known is not None:
            await self.hub.hold(known, self)
        try:
            room, state = await db(services.room_join)(slug=slug, user=self.user)
        except BaseException:
            if known is not None:
                await self.hub.release(known, self, keep=False)
            raise
        group = None if room.is_direct else fanout.room_group(room.pk)
        if group == known:
            return room, state, known
        if known is not None:
            await self.hub.release(known, self, keep=False)
        if len(_room_groups) >= ROOM_GROUPS_KEPT:
            _room_groups.clear()
        if group is None:
            _room_groups.pop(slug, None)
            return room, state, None
        _room_groups[slug] = group
        await self.hub.hold(group, self)
        try:
            return await db(selectors.room_get)(slug=slug), state, group
        except BaseException:
            await self.hub.release(group, self, keep=False)
            raise

    async def _recover(self, room: Room, since: int) -> None:
        payloads, complete = await db(selectors.messages_since)(room=room, since=since)
        for payload in payloads:
            await self._until_written()
            await self.send_frame(protocol.message(payload))
        await self.send_frame(
            protocol.recovered(room_slug=room.slug, complete=complete)
        )

    async def on_leave(self, frame: protocol.Leave) -> None:
        room = self._joined_room(frame)
        await self._exit_room(room)
        await self.send_frame(protocol.left(room_slug=room.slug, ref=frame.ref))

    async def _exit_room(self, room: Room) -> None:
        self.rooms.pop(room.slug, None)
        if not room.is_direct:
            # Set from connect() until disconnect() has left every room.
            assert self.hub is not None
            group = fanout.room_group(room.pk)
            await self.hub.discard(group, self)
            if group in self.presence_floors:
                floors = dict(self.presence_floors)
                del floors[group]
                self.presence_floors = floors
        await services.room_presence_exit(
            room=room, connection_id=self.connection_id, user=self.user
        )
        if not self.closing:
            await registry.connection_rooms_changed(self)

    async def on_send(self, frame: protocol.Send) -> None:
        room = self._joined_room(frame)
        request = services.SendRequest(
            room,
            self.user,
            frame.body,
            frame.client_msg_id,
            frame.reply_to,
            tuple(frame.attachments or ()),
        )
        # Queue the send and read the next frame at once: a client that sends
        # several messages without waiting gets them stored in one transaction
        # (in its order) instead of one transaction each. The ack follows the
        # commit.
        stored = writer.get_writer().enqueue(request)
        task = asyncio.ensure_future(self._ack_when_stored(stored, frame.ref))
        self.sends_in_flight.add(task)
        task.add_done_callback(self.sends_in_flight.discard)
        if len(self.sends_in_flight) >= MAX_SENDS_IN_FLIGHT:
            await asyncio.wait(
                self.sends_in_flight, return_when=asyncio.FIRST_COMPLETED
            )

    async def _ack_when_stored(
        self, stored: asyncio.Future[services.SendResult], ref: str | None
    ) -> None:
        try:
            result = await stored
            if isinstance(result, ChatError):
                await self.send_frame(protocol.error_from(result, ref=ref))
                return
            message, _ = result
            await self.send_frame(
                protocol.ack(ref=ref, room_slug=message.room.slug, message=message)
            )
        except Exception:
            logger.exception("storing a send from %s failed", self.connection_id)
            await self.close_with(protocol.CLOSE_SERVER_ERROR, "server error")

    async def on_dm(self, frame: protocol.DirectMessage) -> None:
        message, _ = await db(services.direct_message_create)(
            author=self.user,
            to_username=frame.to,
            body=frame.body,
            client_msg_id=frame.client_msg_id,
        )
        await self.send_frame(
            protocol.ack(ref=frame.ref, room_slug=message.room.slug, message=message)
        )

    async def on_history(self, frame: protocol.History) -> None:
        room = self.rooms.get(frame.room)
        if room is None:
            room = await db(selectors.room_get_readable)(
                slug=frame.room, user=self.user
            )
        messages, has_more = await db(selectors.message_history)(
            room=room, before=frame.before, limit=frame.limit, thread=frame.thread
        )
        await self.send_frame(
            protocol.history(
                room_slug=room.slug,
                messages=messages,
                has_more=has_more,
                ref=frame.ref,
                thread=frame.thread,
            )
        )

    async def on_typing(self, frame: protocol.Typing) -> None:
        room = self._joined_room(frame)
        await services.typing_send(room=room, user=self.user)

    async def on_edit(self, frame: protocol.Edit) -> None:
        room = self._joined_room(frame)
        message = await db(services.message_edit)(
            room=room, message_id=frame.id, user=self.user, body=frame.body
        )
        await self.send_frame(
            protocol.ack(ref=frame.ref, room_slug=room.slug, message=message)
        )

    async def on_delete(self, frame: protocol.Delete) -> None:
        room = self._joined_room(frame)
        message = await db(services.message_delete)(
            room=room, message_id=frame.id, user=self.user
        )
        await self.send_frame(
            protocol.ack(ref=frame.ref, room_slug=room.slug, message=message)
        )

    async def on_read(self, frame: protocol.Read) -> None:
        room = self._joined_room(frame)
        await db(services.read_marker_set)(room=room, user=self.user, seq=frame.seq)

    async def on_rooms(self, frame: protocol.Rooms) -> None:
        rooms = await db(selectors.rooms_of_user)(user=self.user)
        await self.send_frame(protocol.room_list(rooms=rooms, ref=frame.ref))

    async def on_search(self, frame: protocol.Search) -> None:
        results, has_more = await db(selectors.message_search)(
            user=self.user,
            query=frame.query,
            room_slug=frame.room,
            before=frame.before,
            limit=frame.limit,
        )
        await self.send_frame(
            protocol.search_results(
                query=frame.query, results=results, has_more=has_more, ref=frame.ref
            )
        )

    async def on_react(self, frame: protocol.React) -> None:
        room = self._joined_room(frame)
        message = await db(services.reaction_set)(
            room=room,
            message_id=frame.id,
            user=self.user,
            emoji=frame.emoji,
            on=frame.on,
        )
        await self.send_frame(
            protocol.ack(ref=frame.ref, room_slug=room.slug, message=message)
        )

    async def on_ping(self, frame: protocol.Ping) -> None:
        await self.send_frame(protocol.pong(ref=frame.ref))
