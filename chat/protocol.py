"""Every wire frame of protocol version 1, declared once: schemas, codes, framings.

Client frames are msgspec ``Struct``s tagged by their ``type``: ``parse_json`` and
``parse_binary`` validate and decode a frame in one pass into one of them, or
raise ``ChatError`` with the code the client gets back in an ``error`` frame.
Fields a client sends beyond the schema are ignored, as the contract allows.

Server frames are ``Struct``s too, made by the builder functions below and
encoded once with ``encode``, whatever the number of sockets they go to. Both
framings come from the same declaration: the JSON text carries the ``type`` tag;
the binary framing (``chat.v1.bin``) is the action code, then the frame's fields
without it.

The push API's body (``POST /api/push``) is declared here as well.
"""

import re
import struct
import zlib
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final

import msgspec
from msgspec import Meta, Struct

PROTOCOL_VERSION = 1
SUBPROTOCOL_JSON = "chat.v1"
SUBPROTOCOL_BINARY = "chat.v1.bin"

MAX_FRAME_BYTES = 64 * 1024
MAX_BODY_CHARS = 4000
MAX_ID_CHARS = 64
MAX_REF_CHARS = 64
MAX_USERNAME_CHARS = 150
# The largest whole number every JSON client reads exactly (2^53 - 1).
MAX_SAFE_INTEGER = 2**53 - 1
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 100
RECOVERY_MAX_MESSAGES = 1000
SEARCH_DEFAULT_LIMIT = 20
SEARCH_MAX_LIMIT = 50
MAX_QUERY_CHARS = 200
MAX_EMOJI_CHARS = 16
MAX_ATTACHMENTS = 10
REACTION_USERS_LISTED = 20

# Close codes.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011
CLOSE_TRY_AGAIN = 1013
CLOSE_BANNED = 4403
CLOSE_IDLE = 4408
CLOSE_REPLACED = 4409

# Error codes of the ``error`` frame.
BAD_REQUEST = "bad_request"
NOT_FOUND = "not_found"
FORBIDDEN = "forbidden"
NOT_JOINED = "not_joined"
MUTED = "muted"
RATE_LIMITED = "rate_limited"
TOO_LARGE = "too_large"
ROOM_CLOSED = "room_closed"
# Not in the contract's table (an addition clients may not know): the database is
# out of reach; nothing was stored; try again after ``retry_after`` seconds.
UNAVAILABLE = "unavailable"

# Action codes of the binary framing, both directions.
FRAME_CODES: Final = {
    "hello": 1,
    "join": 2,
    "joined": 3,
    "leave": 4,
    "left": 5,
    "send": 6,
    "ack": 7,
    "message": 8,
    "history": 9,
    "typing": 10,
    "ping": 11,
    "pong": 12,
    "presence": 13,
    "push": 14,
    "error": 15,
    "edit": 16,
    "message_edited": 17,
    "delete": 18,
    "message_deleted": 19,
    "dm": 20,
    "read": 21,
    "recovered": 22,
    "removed": 23,
    "presence_batch": 24,
    "rooms": 25,
    "read_marker": 26,
    "notification": 27,
    "react": 28,
    "reaction": 29,
    "search": 30,
}
FRAME_TYPES: Final = {code: name for name, code in FRAME_CODES.items()}

ROOM_SLUG_PATTERN = r"^[-a-zA-Z0-9_]{1,64}$"
ROOM_SLUG_RE = re.compile(ROOM_SLUG_PATTERN)


class ChatError(Exception):
    """A request the server refuses; becomes an ``error`` frame with ``code``."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


# --- field types ----------------------------------------------------------------

# Text a client sends to be stored: no NUL, which PostgreSQL cannot store (JSON
# cannot carry a lone surrogate to us at all: the decoder refuses the frame).
STORABLE_TEXT = r"^[^\x00]*$"

RoomSlug = Annotated[str, Meta(pattern=ROOM_SLUG_PATTERN)]
Seq = Annotated[int, Meta(ge=0, le=MAX_SAFE_INTEGER)]
MessageId = Annotated[int, Meta(ge=1, le=MAX_SAFE_INTEGER)]
Limit = Annotated[int, Meta(ge=1, le=HISTORY_MAX_LIMIT)]
Body = Annotated[
    str, Meta(min_length=1, max_length=MAX_BODY_CHARS, pattern=STORABLE_TEXT)
]
ClientMsgId = Annotated[
    str, Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=STORABLE_TEXT)
]
Username = Annotated[
    str, Meta(min_length=1, max_length=MAX_USERNAME_CHARS, pattern=STORABLE_TEXT)
]
Ref = Annotated[str, Meta(max_length=MAX_REF_CHARS)]
# 1 to 16 characters, none of them whitespace (nor NUL).
Emoji = Annotated[str, Meta(pattern=rf"^[^\s\x00]{{1,{MAX_EMOJI_CHARS}}}$")]
SearchQuery = Annotated[
    str, Meta(min_length=1, max_length=MAX_QUERY_CHARS, pattern=STORABLE_TEXT)
]
SearchLimit = Annotated[int, Meta(ge=1, le=SEARCH_MAX_LIMIT)]
AttachmentIds = Annotated[list[MessageId], Meta(max_length=MAX_ATTACHMENTS)]


# --- client frames ----------------------------------------------------------------


class ClientFrame(Struct, tag_field="type", kw_only=True):
    """A frame from a client; ``type`` names its handler (``on_<type>``)."""

    type: ClassVar[str]
    ref: Ref | None = None


class Join(ClientFrame, tag="join"):
    type: ClassVar[str] = "join"
    room: RoomSlug
    since: Seq | None = None


class Leave(ClientFrame, tag="leave"):
    type: ClassVar[str] = "leave"
    room: RoomSlug


class Send(ClientFrame, tag="send"):
    type: ClassVar[str] = "send"
    room: RoomSlug
    body: Body
    client_msg_id: ClientMsgId
    reply_to: MessageId | None = None
    attachments: AttachmentIds | None = None


class History(ClientFrame, tag="history"):
    type: ClassVar[str] = "history"
    room: RoomSlug
    before: Seq | None = None
    limit: Limit | None = None
    thread: MessageId | None = None

    def __post_init__(self) -> None:
        if self.limit is None:
            self.limit = HISTORY_DEFAULT_LIMIT


class Typing(ClientFrame, tag="typing"):
    type: ClassVar[str] = "typing"
    room: RoomSlug


class Edit(ClientFrame, tag="edit"):
    type: ClassVar[str] = "edit"
    room: RoomSlug
    id: MessageId
    body: Body


class Delete(ClientFrame, tag="delete"):
    type: ClassVar[str] = "delete"
    room: RoomSlug
    id: MessageId


class Read(ClientFrame, tag="read"):
    type: ClassVar[str] = "read"
    room: RoomSlug
    seq: Seq


class DirectMessage(ClientFrame, tag="dm"):
    type: ClassVar[str] = "dm"
    to: Username
    body: Body
    client_msg_id: ClientMsgId


class Ping(ClientFrame, tag="ping"):
    type: ClassVar[str] = "ping"


class Rooms(ClientFrame, tag="rooms"):
    type: ClassVar[str] = "rooms"


class React(ClientFrame, tag="react"):
    type: ClassVar[str] = "react"
    room: RoomSlug
    id: MessageId
    emoji: Emoji
    on: bool = True


class Search(ClientFrame, tag="search"):
    type: ClassVar[str] = "search"
    query: SearchQuery
    room: RoomSlug | None = None
    before: MessageId | None = None
    limit: SearchLimit | None = None

    def __post_init__(self) -> None:
        if self.limit is None:
            self.limit = SEARCH_DEFAULT_LIMIT


CLIENT_FRAMES: Final[dict[str, type[ClientFrame]]] = {
    cls.type: cls
    for cls in (Join, Leave, Send, History, Typing, Edit, Delete, Read, DirectMessage)
    + (Ping, Rooms, React, Search)
}
_client_decoder = msgspec.json.Decoder(
    Join
    | Leave
    | Send
    | History
    | Typing
    | Edit
    | Delete
    | Read
    | DirectMessage
    | Ping
    | Rooms
    | React
    | Search
)
_binary_decoders = {
    FRAME_CODES[name]: msgspec.json.Decoder(cls) for name, cls in CLIENT_FRAMES.items()
}


class _Envelope(Struct):
    """What a refused frame is read for: its type and ref, to answer it."""

    type: Any = None
    ref: Any = None
    body: Any = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def parse_json(text: str | bytes) -> ClientFrame:
    """Validate and decode a JSON text frame from a client."""
    try:
        return _client_decoder.decode(text)
    except msgspec.ValidationError as exc:  # a DecodeError too: first
        raise _refusal(exc, text, known_type=None) from None
    except (msgspec.DecodeError, RecursionError):
        raise ChatError(BAD_REQUEST, "frame is not valid JSON") from None


def parse_binary(data: bytes) -> ClientFrame:
    """Validate and decode a ``chat.v1.bin`` frame: 4-byte action code, then JSON."""
    if len(data) < 4:
        raise ChatError(BAD_REQUEST, "binary frame is shorter than its 4-byte code")
    (code,) = struct.unpack(">I", data[:4])
    decoder = _binary_decoders.get(code)
    if decoder is None:
        raise ChatError(BAD_REQUEST, f"unknown action code {code}")
    payload = data[4:]
    if not payload.strip():
        payload = b"{}"
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:  # a DecodeError too: first
        raise _refusal(exc, payload, known_type=FRAME_TYPES[code]) from None
    except (msgspec.DecodeError, RecursionError):
        raise ChatError(BAD_REQUEST, "binary frame payload is not valid JSON") from None


def _refusal(
    exc: msgspec.ValidationError, data: str | bytes, *, known_type: str | None
) -> ChatError:
    """The ``ChatError`` for a frame that failed its schema, with its ``ref``."""
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return ChatError(BAD_REQUEST, "frame must be a JSON object")
    ref = envelope.ref
    if ref is not None and not (isinstance(ref, str) and len(ref) <= MAX_REF_CHARS):
        message = f"ref must be a string of at most {MAX_REF_CHARS}"
        return ChatError(BAD_REQUEST, message)
    frame_type = known_type or envelope.type
    if frame_type is None:
        return ChatError(BAD_REQUEST, "frame needs a type", ref=ref)
    if frame_type not in CLIENT_FRAMES:
        return ChatError(BAD_REQUEST, f"unknown frame type {frame_type!r}", ref=ref)
    body = envelope.body
    if isinstance(body, str) and len(body) > MAX_BODY_CHARS:
        message = f"body is longer than {MAX_BODY_CHARS} characters"
        return ChatError(TOO_LARGE, message, ref=ref)
    text = str(exc)
    if repr(STORABLE_TEXT) in text:
        text = f"{_error_field(exc)} must not contain NUL characters"
    return ChatError(BAD_REQUEST, f"{frame_type}: {text}", ref=ref)


# --- server frames ----------------------------------------------------------------


class ServerFrame(Struct, tag_field="type", omit_defaults=True, kw_only=True):
    """A frame to clients; only fields with a default of None are ever left out."""


class Reply(ServerFrame, kw_only=True):
    """A frame that answers a client frame, echoing its ``ref`` when it had one."""

    ref: str | None = None


class User(Struct):
    id: int
    username: str


class ReactionData(Struct):
    """One emoji on a message: how many users, and up to 20 of them."""

    emoji: str
    count: int
    users: list[str]


class AttachmentData(Struct):
    """A file uploaded with ``POST /api/uploads``, as messages carry it."""

    id: int
    name: str
    size: int
    content_type: str
    url: str


class MessageData(Struct):
    """A stored message as clients see it (``message``, ``history``, recovery,
    search, notifications)."""

    room: str
    id: int
    seq: int
    user: User
    body: str
    created_at: str | None
    client_msg_id: str | None
    edited_at: str | None
    deleted: bool
    mentions: list[str]
    reactions: list[ReactionData]
    reply_to: int | None
    reply_count: int
    attachments: list[AttachmentData]


class Hello(ServerFrame, tag="hello"):
    protocol: int
    connection_id: str
    user: User
    heartbeat: int


class Joined(Reply, tag="joined"):
    room: str
    title: str
    last_seq: int
    online: list[str]  # at most presence.ONLINE_LISTED of them
    online_count: int
    read_seq: int
    unread: int
    mentions: int
    private: bool
    direct: bool
    closed: bool


class Recovered(ServerFrame, tag="recovered"):
    room: str
    complete: bool


class Left(Reply, tag="left"):
    room: str


class MessageFrame(MessageData, ServerFrame, tag="message"):
    pass


class Ack(Reply, tag="ack"):
    room: str
    client_msg_id: str | None
    id: int
    seq: int


class HistoryPage(Reply, tag="history"):
    room: str
    messages: list[MessageData]
    has_more: bool
    thread: int | None = None


class RoomEntry(Struct):
    """A room of the user's, as the ``rooms`` reply lists it."""

    room: str
    title: str
    is_private: bool
    is_direct: bool
    last_seq: int
    read_seq: int
    unread: int
    mentions: int
    last_message: MessageData | None


class RoomList(Reply, tag="rooms"):
    rooms: list[RoomEntry]


class ReadMarker(ServerFrame, tag="read_marker"):
    room: str
    seq: int
    unread: int
    mentions: int


class Notification(ServerFrame, tag="notification"):
    kind: str
    room: str
    message: MessageData


class ReactionFrame(ServerFrame, tag="reaction"):
    room: str
    id: int
    seq: int
    emoji: str
    user: str
    on: bool
    count: int


class SearchResults(Reply, tag="search"):
    query: str
    results: list[MessageData]
    has_more: bool


class TypingFrame(ServerFrame, tag="typing"):
    room: str
    user: str


class Presence(ServerFrame, tag="presence"):
    room: str
    user: str
    status: str


class PresenceBatch(ServerFrame, tag="presence_batch"):
    room: str
    online: list[str]
    offline: list[str]
    online_count: int


class MessageEdited(ServerFrame, tag="message_edited"):
    room: str
    id: int
    seq: int
    body: str
    edited_at: str | None
    # An addition to the contract's fields: the mentions of the new body.
    mentions: list[str]


class MessageDeleted(ServerFrame, tag="message_deleted"):
    room: str
    id: int
    seq: int


class Removed(ServerFrame, tag="removed"):
    room: str
    reason: str


class Push(ServerFrame, tag="push"):
    event: str
    data: Any


class Pong(Reply, tag="pong"):
    pass


class Error(Reply, tag="error"):
    code: str
    message: str
    retry_after: float | None = None


SERVER_FRAMES: Final[dict[str, type[ServerFrame]]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        Hello,
        Joined,
        Recovered,
        Left,
        MessageFrame,
        Ack,
        HistoryPage,
        TypingFrame,
        Presence,
        MessageEdited,
        MessageDeleted,
        Removed,
        Push,
        Pong,
        Error,
        PresenceBatch,
        RoomList,
        ReadMarker,
        Notification,
        ReactionFrame,
        SearchResults,
    )
}


def timestamp(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with milliseconds and a Z, or None."""
    if value is None:
        return None
    if value.utcoffset():
        value = value.astimezone(UTC)
    # "2026-12-02T12:00:00.123" and any offset cut off (isoformat is the fastest).
    return value.isoformat(timespec="milliseconds")[:23] + "Z"


def user_payload(user: Any) -> User:
    return User(id=user.pk, username=user.get_username())


def message_payload(message: Any, room_slug: str, author: Any) -> MessageData:
    """The shared shape of a stored message (``message``, ``history``, …).

    A deleted message shows no body, mentions, reactions or attachments.
    """
    deleted = message.deleted_at is not None
    return MessageData(
        room=room_slug,
        id=message.pk,
        seq=message.seq,
        user=User(id=author.pk, username=author.get_username()),
        body="" if deleted else message.body,
        created_at=timestamp(message.created_at),
        client_msg_id=message.client_msg_id,
        edited_at=timestamp(message.edited_at),
        deleted=deleted,
        mentions=[] if deleted else list(message.mention_names),
        reactions=[] if deleted else _reactions(message.reaction_summary),
        reply_to=message.reply_to_id,
        reply_count=message.reply_count,
        attachments=[] if deleted else _attachments(message.attachment_summary),
    )


def _attachments(summary: list[dict[str, Any]]) -> list[AttachmentData]:
    if not summary:
        return []
    return msgspec.convert(summary, list[AttachmentData])


def _reactions(summary: list[dict[str, Any]]) -> list[ReactionData]:
    if not summary:
        return []
    return msgspec.convert(summary, list[ReactionData])


def hello(*, connection_id: str, user: Any, heartbeat: int) -> Hello:
    return Hello(
        protocol=PROTOCOL_VERSION,
        connection_id=connection_id,
        user=user_payload(user),
        heartbeat=heartbeat,
    )


def joined(
    *,
    room: Any,
    online: list[str],
    online_count: int,
    read_seq: int,
    unread: int,
    mentions: int,
    ref: str | None,
) -> Joined:
    return Joined(
        room=room.slug,
        title=room.title,
        last_seq=room.last_seq,
        online=online,
        online_count=online_count,
        read_seq=read_seq,
        unread=unread,
        mentions=mentions,
        private=room.is_private,
        direct=room.is_direct,
        closed=room.is_closed,
        ref=ref,
    )


def recovered(*, room_slug: str, complete: bool) -> Recovered:
    return Recovered(room=room_slug, complete=complete)


def left(*, room_slug: str, ref: str | None) -> Left:
    return Left(room=room_slug, ref=ref)


def message(payload: MessageData) -> MessageFrame:
    return MessageFrame(*(getattr(payload, name) for name in _MESSAGE_FIELDS))


_MESSAGE_FIELDS = MessageData.__struct_fields__


def ack(*, ref: str | None, room_slug: str, message: Any) -> Ack:
    return Ack(
        room=room_slug,
        client_msg_id=message.client_msg_id,
        id=message.pk,
        seq=message.seq,
        ref=ref,
    )


def history(
    *,
    room_slug: str,
    messages: list[MessageData],
    has_more: bool,
    ref: str | None,
    thread: int | None = None,
) -> HistoryPage:
    return HistoryPage(
        room=room_slug, messages=messages, has_more=has_more, ref=ref, thread=thread
    )


def room_list(*, rooms: list[RoomEntry], ref: str | None) -> RoomList:
    return RoomList(rooms=rooms, ref=ref)


def read_marker(*, room_slug: str, seq: int, unread: int, mentions: int) -> ReadMarker:
    return ReadMarker(room=room_slug, seq=seq, unread=unread, mentions=mentions)


def mention_notification(*, payload: MessageData) -> Notification:
    return Notification(kind="mention", room=payload.room, message=payload)


def reaction(
    *, room_slug: str, message: Any, emoji: str, username: str, on: bool, count: int
) -> ReactionFrame:
    return ReactionFrame(
        room=room_slug,
        id=message.pk,
        seq=message.seq,
        emoji=emoji,
        user=username,
        on=on,
        count=count,
    )


def search_results(
    *, query: str, results: list[MessageData], has_more: bool, ref: str | None
) -> SearchResults:
    return SearchResults(query=query, results=results, has_more=has_more, ref=ref)


def typing(*, room_slug: str, username: str) -> TypingFrame:
    return TypingFrame(room=room_slug, user=username)


def presence(*, room_slug: str, username: str, status: str) -> Presence:
    return Presence(room=room_slug, user=username, status=status)


def presence_batch(
    *, room_slug: str, changes: dict[str, str], online_count: int
) -> PresenceBatch:
    """Who came online and who went offline (``changes``: username -> status)."""
    return PresenceBatch(
        room=room_slug,
        online=sorted(u for u, status in changes.items() if status == "online"),
        offline=sorted(u for u, status in changes.items() if status == "offline"),
        online_count=online_count,
    )


def message_edited(*, room_slug: str, message: Any) -> MessageEdited:
    return MessageEdited(
        room=room_slug,
        id=message.pk,
        seq=message.seq,
        body=message.body,
        edited_at=timestamp(message.edited_at),
        mentions=list(message.mention_names),
    )


def message_deleted(*, room_slug: str, message: Any) -> MessageDeleted:
    return MessageDeleted(room=room_slug, id=message.pk, seq=message.seq)


def removed(*, room_slug: str, reason: str) -> Removed:
    return Removed(room=room_slug, reason=reason)


def push(*, event: str, data: Any) -> Push:
    return Push(event=event, data=data)


def pong(*, ref: str | None) -> Pong:
    return Pong(ref=ref)


def error(*, code: str, message: str, ref: str | None = None, **extra: Any) -> Error:
    return Error(code=code, message=message, ref=ref, **extra)


def error_from(exc: ChatError, ref: str | None = None) -> Error:
    extra = dict(exc.extra)
    ref = extra.pop("ref", None) or ref
    return error(code=exc.code, message=exc.message, ref=ref, **extra)


# --- encoding ---------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_SERVER_DECODERS = {
    name: msgspec.json.Decoder(cls) for name, cls in SERVER_FRAMES.items()
}


def frame_type(frame: ServerFrame) -> str:
    """The ``type`` of a server frame."""
    return frame.__struct_config__.tag  # type: ignore[return-value]


# A socket's framing: what its frames look like on the wire, one small int so
# that an encoded frame caches its ready form per framing. JSON and BINARY are
# False and True as ints (the subprotocols); with ``?compress=gzip`` a frame
# whose JSON is over COMPRESS_ABOVE bytes goes gzip-compressed.
FRAMING_JSON = 0
FRAMING_BINARY = 1
FRAMING_JSON_GZIP = 2
FRAMING_BINARY_GZIP = 3
COMPRESS_ABOVE = 1024
# Set on the action code of a chat.v1.bin frame whose JSON is compressed.
COMPRESSED_CODE_BIT = 0x80000000


def framing(*, binary: bool, gzip: bool) -> int:
    return (FRAMING_BINARY if binary else FRAMING_JSON) + (2 if gzip else 0)


def _gzip(data: bytes) -> bytes:
    # Level 6 (zlib's default): most of level 9's saving at a fraction of its
    # CPU; no name or time in the header, so equal frames compress equally.
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


class Encoded:
    """One outbound frame serialized once, ready for any number of sockets.

    ``text`` is the JSON text frame; ``binary`` the ``chat.v1.bin`` frame, built
    on first use from the frame's fields (decoded from ``text`` by its schema
    when the frame came over the channel layer as text only). ``wire`` gives
    the payload for a framing, compressed once however many sockets get it.
    """

    __slots__ = ("type", "text", "frame", "_binary", "prepared")

    def __init__(
        self, frame_type: str, text: str, frame: ServerFrame | None = None
    ) -> None:
        self.type = frame_type
        self.text = text
        self.frame = frame
        self._binary: bytes | None = None
        self.prepared: dict[int, Any] = {}  # per framing, the server's ready form

    @property
    def binary(self) -> bytes:
        if self._binary is None:
            frame = self.frame
            if frame is None:
                frame = self.frame = _SERVER_DECODERS[self.type].decode(self.text)
            self._binary = struct.pack(">I", FRAME_CODES[self.type]) + _encoder.encode(
                _fields_of(frame)
            )
        return self._binary

    def wire(self, framing: int) -> tuple[bytes, bool]:
        """The payload of this frame in ``framing`` and whether it is binary.

        Compressed (gzip framings) when its JSON is over ``COMPRESS_ABOVE``
        bytes: in JSON framing a binary frame holding the gzip of the JSON text;
        in chat.v1.bin the action code with ``COMPRESSED_CODE_BIT`` set, then
        the gzip of the JSON. Callers cache the result (``serving.prepared``).
        """
        if framing & FRAMING_BINARY:
            data = self.binary
            if framing >= FRAMING_JSON_GZIP and len(data) - 4 > COMPRESS_ABOVE:
                (code,) = struct.unpack_from(">I", data)
                data = struct.pack(">I", code | COMPRESSED_CODE_BIT) + _gzip(data[4:])
            return data, True
        text = self.text.encode()
        if framing >= FRAMING_JSON_GZIP and len(text) > COMPRESS_ABOVE:
            return _gzip(text), True
        return text, False


def _fields_of(frame: ServerFrame) -> dict[str, Any]:
    """The frame's fields without its tag, leaving out unset optional ones."""
    optional = _optional_fields(type(frame))
    return {
        name: value
        for name, value in msgspec.structs.asdict(frame).items()
        if value is not None or name not in optional
    }


_optional: dict[type, frozenset[str]] = {}


def _optional_fields(cls: type[ServerFrame]) -> frozenset[str]:
    names = _optional.get(cls)
    if names is None:
        fields = cls.__struct_fields__
        defaults = cls.__struct_defaults__
        names = _optional[cls] = frozenset(fields[len(fields) - len(defaults) :])
    return names


def encode(frame: ServerFrame) -> Encoded:
    """Serialize an outbound frame once."""
    return Encoded(frame_type(frame), _encoder.encode(frame).decode(), frame)


# --- the push API's body ------------------------------------------------------------

PUSH_TARGETS: Final = ("user", "room", "connection_id", "all")


# A connection id as ``hello`` gives it: the process id, a dash, a counter.
CONNECTION_ID_PATTERN = r"^[0-9a-f]{8}-[0-9]{1,18}$"
PushName = Annotated[str, Meta(min_length=1, max_length=150, pattern=STORABLE_TEXT)]


class PushRequest(Struct):
    """``POST /api/push``: an event, its data, and exactly one target."""

    event: str
    data: Any
    user: PushName | None = None
    room: RoomSlug | None = None
    connection_id: Annotated[str, Meta(pattern=CONNECTION_ID_PATTERN)] | None = None
    all: bool | None = None

    def target(self) -> tuple[str, Any]:
        """The one target named, as (name, value); ``ChatError`` otherwise."""
        named = [name for name in PUSH_TARGETS if getattr(self, name) is not None]
        if len(named) != 1:
            raise ChatError(
                BAD_REQUEST, f"name exactly one target: {', '.join(PUSH_TARGETS)}"
            )
        name = named[0]
        if name == "all" and self.all is not True:
            raise ChatError(BAD_REQUEST, "'all' must be true")
        return name, getattr(self, name)


_push_decoder = msgspec.json.Decoder(PushRequest)
_PUSH_FIELD_ERRORS = {
    "event": "the body needs an 'event' string",
    "data": "the body needs 'data' (any JSON)",
    "all": "'all' must be true",
    "user": "'user' must be a username",
    "room": "'room' must be a room slug (letters, digits, - and _)",
    "connection_id": "'connection_id' must be a connection id as hello gives it",
}
_ERROR_FIELD_RE = re.compile(r"at `\$\.(\w+)`|missing required field `(\w+)`")


def parse_push_request(body: bytes) -> PushRequest:
    """Validate and decode a push API body; ``ChatError`` says what is wrong."""
    try:
        return _push_decoder.decode(body)
    except msgspec.ValidationError as exc:  # a DecodeError too: first
        raise ChatError(BAD_REQUEST, _push_error_text(exc)) from None
    except (msgspec.DecodeError, RecursionError):
        raise ChatError(BAD_REQUEST, "the body is not valid JSON") from None


def _error_field(exc: msgspec.ValidationError) -> str | None:
    """The top-level field a validation error is about, if it names one."""
    match = _ERROR_FIELD_RE.search(str(exc))
    return (match.group(1) or match.group(2)) if match else None


def _push_error_text(exc: msgspec.ValidationError) -> str:
    field = _error_field(exc)
    if field is None:
        return "the body must be a JSON object with 'event' and 'data'"
    return _PUSH_FIELD_ERRORS.get(field, f"'{field}' is not valid")
