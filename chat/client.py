"""What a client of chatsite does on its side of the wire, and a client.

The room page (``chat/static/chat/chat.js``), the tests' socket clients and the
benchmark's load generator reconnect by the same rule (``reconnect_delay``), so
that a process that goes away does not bring all of its sockets back in one
instant. ``ChatClient`` is an asyncio client that does all a client should:
both framings, gzip, replies matched by ref, reconnect and resume.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import logging
import random as _random
import ssl as _ssl
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

from chat.protocol import (
    CLOSE_BANNED,
    CLOSE_GOING_AWAY,
    CLOSE_REPLACED,
    COMPRESSED_CODE_BIT,
    FRAME_CODES,
    SUBPROTOCOL_BINARY,
    SUBPROTOCOL_JSON,
)

logger = logging.getLogger(__name__)

FRAME_NAMES = {code: name for name, code in FRAME_CODES.items()}
CONNECT_TIMEOUT_SECONDS = 10.0

# Full-jitter exponential backoff: retry n (from 0) waits a random time in
# [0, min(BACKOFF_MAX, BACKOFF_FIRST * 2**n)).
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
# After a 1001 (a process going away, as in a deploy) another process is up
# already: the first retry only spreads the sockets over this window.
FIRST_AFTER_GOING_AWAY_SECONDS = 2.0


def reconnect_delay(
    attempt: int,
    close_code: int | None = None,
    random: Callable[[], float] = _random.random,
) -> float:
    """Seconds to wait before reconnect ``attempt`` (0 for the first retry).

    ``random`` answers in [0, 1); a test passes its own to get exact delays.
    """
    if attempt == 0 and close_code == CLOSE_GOING_AWAY:
        return random() * FIRST_AFTER_GOING_AWAY_SECONDS
    # Capped before the power: a client retrying for days must not overflow.
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** min(attempt, 32))
    return random() * ceiling


# --- an asyncio client ----------------------------------------------------------

# Closes after which a client must not come back on its own: banned or kicked,
# replaced by a newer socket of the same device key.
NO_RECONNECT = frozenset({CLOSE_BANNED, CLOSE_REPLACED})
# A reply to a request of ours carries its ref; these frames are replies.
REPLY_TYPES = frozenset(
    {"joined", "left", "ack", "history", "pong", "error", "recovered", "rooms"}
    | {"search"}
)


# The keep-alive's ping carries this ref; its pong is dropped, never handed on.
KEEPALIVE_REF = "keepalive"
# Code of a socket that ended without a close frame (RFC 6455, 7.1.5).
CLOSE_ABNORMAL = 1006


class ChatError(Exception):
    """Something the client was waiting for did not come as expected."""


class ChatClosed(ChatError):
    """The client stopped: closed by us, or by a close it must not retry."""

    def __init__(self, code: int | None, reason: str = "", detail: str = "") -> None:
        message = f"closed with {code} {reason}".strip()
        super().__init__(f"{detail}: {message}" if detail else message)
        self.code = code
        self.reason = reason


class ChatRefused(ChatError):
    """The server refused the handshake with an HTTP status (403, say)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status


class _SocketEnded:
    """What ``inbox`` holds where a socket ended: its close code and reason."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int | None, reason: str) -> None:
        self.code = code
        self.reason = reason


class ChatClient:
    """An asyncio client of chatsite's WebSocket protocol.

    - Speaks both framings (``binary``: ``chat.v1.bin``) and ``?compress=gzip``
      (``compress``), and gives every frame as a dict with its ``type``.
    - ``request`` sends a frame with a fresh ``ref`` and answers the reply that
      carries it (an ``error`` reply too: look at its ``type``).
    - When the socket drops it reconnects with ``reconnect_delay``'s jittered
      backoff, to the next of ``urls`` in turn, rejoins every room it joined
      with ``since`` (the highest seq it saw there) and sends again, with the
      same ``client_msg_id``, every message not acknowledged yet; the server
      stores each once. ``send_message`` answers the ``ack`` however many
      sockets that took.
    - Everything else the server sends (``message``, ``presence``, ``typing``,
      ``push``…) waits in ``events`` in arrival order. With ``record``,
      ``frames`` keeps every frame of every socket, a list per socket, and
      ``wire`` the same frames as they came (text, or bytes), for tests; a
      long session would grow them without end. A frame in ``frames`` is the
      very dict ``next_frame`` or ``events`` hands out, so ``wire`` has its
      raw form at the same index. ``retries`` says when each reconnect
      attempt began, after which delay.
    - With ``ordered``, every frame instead waits in one queue in the order it
      came, replies included, with each socket's end where it happened: read
      it with ``next_frame``, ``expect``, ``nothing`` and ``expect_close`` (a
      conversation read frame by frame, as a test or a bot does).
    - ``until(condition)`` waits until a condition over what came holds.

    It needs the ``websockets`` package (a test and bench dependency of
    chatsite; ``pip install websockets`` for a client of your own).
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        token: str | None = None,
        binary: bool = False,
        compress: bool = False,
        device: str | None = None,
        reconnect: bool = True,
        headers: dict[str, str] | None = None,
        record: bool = False,
        ordered: bool = False,
        keepalive: bool | float = True,
        subprotocols: Sequence[str] | None = None,
        query: dict[str, str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        name: str = "client",
        explain: Callable[[], str] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        """``keepalive``: seconds between pings, True for half the heartbeat,
        False for none. ``subprotocols`` replaces the one ``binary`` picks (an
        empty list offers none). ``query`` adds parameters to the URL. ``name``
        and ``explain`` (text such as a server log) go into every ``ChatError``.
        ``connect_timeout`` bounds each handshake and its ``hello``.
        """
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.token = token
        self.binary = binary
        self.compress = compress
        self.device = device
        self.reconnect = reconnect
        self.headers = dict(headers or {})
        self.keepalive = keepalive
        self.subprotocols = (
            list(subprotocols)
            if subprotocols is not None
            else [SUBPROTOCOL_BINARY if binary else SUBPROTOCOL_JSON]
        )
        self.query = dict(query or {})
        self.ssl = ssl
        self.name = name
        self.explain = explain
        self.connect_timeout = connect_timeout
        self.hello: dict[str, Any] | None = None
        self.subprotocol: str | None = None  # the one the server chose
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ordered = ordered
        self.inbox: asyncio.Queue[dict[str, Any] | _SocketEnded] = asyncio.Queue()
        self.record = record
        self.frames: list[list[dict[str, Any]]] = []
        self.wire: list[list[str | bytes]] = []
        # Per reconnect attempt: (time.monotonic() it began, the delay before it).
        self.retries: list[tuple[float, float]] = []
        self.closes: list[tuple[int | None, str]] = []  # per socket that ended
        self.rooms: dict[str, int | None] = {}  # joined: room -> highest seq seen
        self.unacked: dict[str, dict[str, Any]] = {}  # client_msg_id -> send frame
        self.reconnects = 0
        self.connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._refs = itertools.count(1)
        self._url_index = 0
        self._websocket: Any = None
        self._runner: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._closed: ChatClosed | None = None

    # --- life ---------------------------------------------------------------

    async def connect(self) -> ChatClient:
        """Open the first socket and wait for its ``hello``; then keep it up.

        Raises ``ChatRefused`` when the handshake is answered with an HTTP
        status, ``ChatClosed`` when the socket closes before its ``hello``.
        """
        await self._open()
        loop = asyncio.get_running_loop()
        self._runner = loop.create_task(self._run())
        if self.keepalive is not False:
            self._keepalive = loop.create_task(self._ping_forever())
        return self

    def stop_pinging(self) -> None:
        """No more keep-alive pings (to let the server find the socket silent)."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    async def __aenter__(self) -> ChatClient:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, code: int = 1000) -> None:
        """Close the socket and stop reconnecting."""
        self._stop(ChatClosed(code, "closed by the client"))
        self.stop_pinging()
        if self._websocket is not None:
            await self._websocket.close(code)
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    def _url(self) -> str:
        url = self.urls[self._url_index % len(self.urls)]
        query = {}
        if self.token is not None:
            query["token"] = self.token
        if self.device is not None:
            query["device"] = self.device
        if self.compress:
            query["compress"] = "gzip"
        query.update(self.query)
        if query:
            url += ("&" if "?" in url else "?") + urlencode(query)
        return url

    async def _open(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        try:
            websocket = await asyncio.wait_for(
                connect(
                    self._url(),
                    subprotocols=self.subprotocols or None,  # type: ignore[arg-type]
                    additional_headers=self.headers,
                    max_queue=None,
                    ping_interval=None,  # pings of the protocol, not WebSocket's
                    close_timeout=2,
                    max_size=None,
                    ssl=self.ssl,
                ),
                self.connect_timeout,
            )
        except InvalidStatus as exc:
            raise ChatRefused(exc.response.status_code) from None
        try:
            raw = await asyncio.wait_for(websocket.recv(), self.connect_timeout)
            hello = self._decode(raw)
        except ConnectionClosed:
            code, reason = websocket.close_code, websocket.close_reason or ""
            raise ChatClosed(code, reason) from None
        except BaseException:
            await websocket.close()
            raise
        if hello.get("type") != "hello":
            await websocket.close()
            raise ChatClosed(None, f"expected hello, got {hello!r}")
        self._websocket = websocket
        self.hello = hello
        self.subprotocol = websocket.subprotocol
        if self.record:
            self.frames.append([hello])
            self.wire.append([raw])
        self.connected.set()
        self._changed.set()

    async def _run(self) -> None:
        try:
            await self._keep_connected()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("chat client stopped")
            self._stop(ChatClosed(None, f"client failed: {exc!r}"))

    async def _keep_connected(self) -> None:
        attempt = 0
        while True:
            code, reason = await self._read_until_closed()
            self.closes.append((code, reason))
            self.connected.clear()
            if self.ordered:
                self.inbox.put_nowait(_SocketEnded(code, reason))
            self._changed.set()
            self._fail_replies(ChatClosed(code, reason))
            if self._closed is not None:
                return
            if not self.reconnect or code in NO_RECONNECT:
                self._stop(ChatClosed(code, reason))
                return
            while True:
                delay = reconnect_delay(attempt, code)
                await asyncio.sleep(delay)
                self.retries.append((time.monotonic(), delay))
                self._url_index += 1
                try:
                    await self._open()
                except (OSError, TimeoutError, ChatClosed) as exc:
                    if isinstance(exc, ChatClosed) and self._closed is not None:
                        return
                    attempt, code = attempt + 1, None
                    continue
                except Exception:  # a refused handshake (HTTP 403 and such)
                    attempt, code = attempt + 1, None
                    continue
                break
            attempt = 0
            self.reconnects += 1
            self._resume()

    async def _ping_forever(self) -> None:
        # The server closes a socket silent for twice its heartbeat (4408).
        while self._closed is None:
            if self.keepalive is True:
                interval = ((self.hello or {}).get("heartbeat") or 30) / 2
            else:
                interval = float(self.keepalive)
            await asyncio.sleep(interval)
            if self.connected.is_set():
                await self._send_quietly({"type": "ping", "ref": KEEPALIVE_REF})

    def _resume(self) -> None:
        # Rejoin with since and send again what was not acknowledged; the
        # replies are not waited for here (the reader must run to get them).
        for room, seq in self.rooms.items():
            frame: dict[str, Any] = {"type": "join", "room": room}
            if seq is not None:
                frame["since"] = seq
            asyncio.get_running_loop().create_task(self._send_quietly(frame))
        for frame in list(self.unacked.values()):
            asyncio.get_running_loop().create_task(self._send_quietly(frame))

    async def _send_quietly(self, frame: dict[str, Any]) -> None:
        try:
            await self._send(frame)
        except Exception:
            pass  # dropped again: the next socket resumes it

    async def _read_until_closed(self) -> tuple[int | None, str]:
        from websockets.exceptions import ConnectionClosed

        websocket = self._websocket
        frames = self.frames[-1] if self.record else None
        wire = self.wire[-1] if self.record else None
        try:
            async for raw in websocket:
                frame = self._decode(raw)
                if frame.get("type") == "pong" and frame.get("ref") == KEEPALIVE_REF:
                    continue  # the keep-alive's
                if frames is not None and wire is not None:
                    frames.append(frame)
                    wire.append(raw)
                self._dispatch(frame)
                self._changed.set()
        except ConnectionClosed:
            pass
        # 1006 when no close frame came (the connection just dropped).
        return websocket.close_code, websocket.close_reason or ""

    def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        ref = frame.get("ref")
        if self.ordered:
            self.inbox.put_nowait(frame)
        room = frame.get("room")
        if isinstance(room, str) and room in self.rooms:
            seq = frame.get("seq") if kind == "message" else None
            if kind == "joined" and self.rooms[room] is None:
                # Nothing seen there yet: what the room held at the join is.
                seq = frame.get("last_seq")
            if isinstance(seq, int):
                seen = self.rooms[room]
                self.rooms[room] = seq if seen is None else max(seen, seq)
        # A send's ref is its client_msg_id: its ack or error answers it.
        sent = frame.get("client_msg_id") if kind == "ack" else ref
        if kind in ("ack", "error") and isinstance(sent, str):
            if kind == "ack" or sent in self._acks:
                self.unacked.pop(sent, None)
            waiting = self._acks.pop(sent, None)
            if waiting is not None:
                if not waiting.done():
                    waiting.set_result(frame)
                return
        if kind in REPLY_TYPES and isinstance(ref, str) and ref in self._replies:
            waiting = self._replies.pop(ref)
            if not waiting.done():
                waiting.set_result(frame)
            return
        # Everything else, replies to the resume's own frames included.
        if not self.ordered:
            self.events.put_nowait(frame)

    def _fail_replies(self, error: ChatClosed) -> None:
        for waiting in self._replies.values():
            if not waiting.done():
                waiting.set_exception(error)
        self._replies.clear()

    def _stop(self, error: ChatClosed) -> None:
        self._closed = error
        self._fail_replies(error)
        for waiting in self._acks.values():
            if not waiting.done():
                waiting.set_exception(error)
        self._acks.clear()

    # --- the wire -------------------------------------------------------------

    def _decode(self, raw: str | bytes) -> dict[str, Any]:
        if isinstance(raw, str):
            return json.loads(raw)
        if not self.binary:  # JSON framing: a binary frame is gzipped JSON
            return json.loads(gzip.decompress(raw))
        (code,) = struct.unpack_from(">I", raw)
        body = raw[4:]
        if code & COMPRESSED_CODE_BIT:
            code &= ~COMPRESSED_CODE_BIT
            body = gzip.decompress(body)
        return {"type": FRAME_NAMES[code], **json.loads(body)}

    async def _send(self, frame: dict[str, Any]) -> None:
        if self.binary:
            fields = {k: v for k, v in frame.items() if k != "type"}
            data: str | bytes = (
                struct.pack(">I", FRAME_CODES[frame["type"]])
                + json.dumps(fields).encode()
            )
        else:
            data = json.dumps(frame)
        await self._send_data(data)

    async def _send_data(self, data: str | bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        if self._websocket is None:
            raise ChatClosed(None, "not connected")
        try:
            await self._websocket.send(data)
        except ConnectionClosed:
            # Closed before its close was read: say so as the client's own error.
            code, reason = self._websocket.close_code, self._websocket.close_reason
            raise ChatClosed(code, reason or "") from None

    # --- requests ---------------------------------------------------------------

    async def send(self, frame: dict[str, Any]) -> None:
        """Send ``frame`` as it is, expecting no particular reply."""
        if self._closed is not None:
            raise self._closed
        await self._send(frame)

    async def send_raw(self, data: str | bytes) -> None:
        """Send one WebSocket frame as given: text for ``str``, binary for bytes."""
        await self._send_data(data)

    async def request(
        self, frame: dict[str, Any], *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Send ``frame`` with a fresh ref (or the ``ref`` it has); answer the
        reply carrying it."""
        if self._closed is not None:
            raise self._closed
        ref = frame.get("ref") or f"r{next(self._refs)}"
        waiting = asyncio.get_running_loop().create_future()
        self._replies[ref] = waiting
        try:
            await self._send({**frame, "ref": ref})
            return await asyncio.wait_for(waiting, timeout)
        finally:
            self._replies.pop(ref, None)

    async def join(self, room: str, *, since: int | None = None) -> dict[str, Any]:
        """Join ``room`` (replaying from ``since``); answer ``joined`` or ``error``.

        From then on the room is rejoined after every reconnect.
        """
        frame: dict[str, Any] = {"type": "join", "room": room}
        if since is not None:
            frame["since"] = since
        reply = await self.request(frame)
        if reply["type"] == "joined":
            self.rooms.setdefault(room, since if since is not None else None)
            if self.rooms[room] is None:
                self.rooms[room] = reply.get("last_seq")
        return reply

    async def leave(self, room: str) -> dict[str, Any]:
        self.rooms.pop(room, None)
        return await self.request({"type": "leave", "room": room})

    async def send_message(
        self,
        room: str,
        body: str,
        *,
        client_msg_id: str | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Send a message; answer its ``ack`` (or the ``error`` refusing it).

        Until the ack comes it is sent again, with the same ``client_msg_id``,
        on every new socket.
        """
        if self._closed is not None:
            raise self._closed
        client_msg_id = client_msg_id or f"c-{uuid.uuid4().hex}"
        frame = {
            "type": "send",
            "room": room,
            "body": body,
            "client_msg_id": client_msg_id,
            "ref": client_msg_id,
        }
        waiting = asyncio.get_running_loop().create_future()
        self._acks[client_msg_id] = waiting
        self.unacked[client_msg_id] = frame
        try:
            await self._send(frame)
        except Exception:
            pass  # not sent: the next socket sends it
        try:
            return await asyncio.wait_for(waiting, timeout)
        finally:
            self._acks.pop(client_msg_id, None)

    async def next_event(self, *types: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame in ``events`` (of one of ``types``, skipping others)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            frame = await asyncio.wait_for(self.events.get(), max(remaining, 0))
            if not types or frame["type"] in types:
                return frame

    async def until(
        self, condition: Callable[[], Any], what: str, *, timeout: float = 10.0
    ) -> None:
        """Wait until ``condition()`` holds, checked after every frame and close."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not condition():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise self._error(f"{what} not within {timeout}s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    # --- reading in order (``ordered``) --------------------------------------------

    def _error(self, message: str, kind: type[ChatError] = ChatError) -> ChatError:
        text = f"{self.name}: {message}"
        if self.explain is not None:
            text += "\n" + self.explain()
        return kind(text)

    async def _next(self, timeout: float) -> dict[str, Any] | _SocketEnded | None:
        if not self.ordered:
            raise ChatError("reading in order needs ChatClient(ordered=True)")
        try:
            return await asyncio.wait_for(self.inbox.get(), max(timeout, 0))
        except TimeoutError:
            return None

    async def next_frame(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next frame that came, whatever its type.

        Raises ``ChatClosed`` where the socket ended, ``ChatError`` when nothing
        came within ``timeout`` seconds.
        """
        item = await self._next(timeout)
        if item is None:
            raise self._error(f"no frame within {timeout}s")
        if isinstance(item, _SocketEnded):
            detail = self._error("the socket ended").args[0]
            raise ChatClosed(item.code, item.reason, detail)
        return item

    async def expect(
        self,
        frame_type: str | Sequence[str],
        *,
        skip: Sequence[str] = (),
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """The next frame of ``frame_type`` (a type, or any of several types),
        passing over frames whose type is in ``skip``; any other fails."""
        wanted = {frame_type} if isinstance(frame_type, str) else set(frame_type)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                frame = await self.next_frame(remaining)
            except ChatClosed as closed:
                raise self._error(
                    f"expected {frame_type!r}, the socket closed "
                    f"with {closed.code} {closed.reason!r}"
                ) from None
            if frame["type"] in wanted:
                return frame
            if frame["type"] not in skip:
                raise self._error(f"expected {frame_type!r}, got {frame}")

    async def nothing(self, timeout: float = 0.3) -> None:
        """Fail if any frame, or the socket's end, comes within ``timeout``."""
        item = await self._next(timeout)
        if isinstance(item, _SocketEnded):
            raise self._error(f"expected nothing, closed with {item.code}")
        if item is not None:
            raise self._error(f"expected no frame, got {item}")

    async def expect_close(
        self, *, skip: Sequence[str] = (), timeout: float = 10.0
    ) -> tuple[int, str]:
        """The (code, reason) of the server's close frame, after any frames of
        types in ``skip``; fails on another frame, or an end with no close frame."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            item = await self._next(deadline - asyncio.get_running_loop().time())
            if item is None:
                raise self._error(f"still open after {timeout}s")
            if isinstance(item, _SocketEnded):
                if item.code in (None, CLOSE_ABNORMAL):
                    raise self._error("the connection ended without a close frame")
                return item.code, item.reason
            if item["type"] not in skip:
                raise self._error(f"expected the close, got {item}")
