"""Every wire frame of protocol version 1: inbound parsing, outbound shapes, codes.

Inbound frames are JSON objects with a ``type``; ``parse_json`` and
``parse_binary`` turn them into a ``ClientFrame`` or raise ``ChatError`` with
the code the client gets back in an ``error`` frame. Outbound frames are built
by the functions below and encoded once with ``encode``, whatever the number of
sockets they go to.
"""

import json
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime

PROTOCOL_VERSION = 1
SUBPROTOCOL_JSON = "chat.v1"
SUBPROTOCOL_BINARY = "chat.v1.bin"

MAX_FRAME_BYTES = 64 * 1024
MAX_BODY_CHARS = 4000
MAX_ID_CHARS = 64
MAX_REF_CHARS = 64
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 100
RECOVERY_MAX_MESSAGES = 1000

# Close codes.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011
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

# Action codes of the binary framing, both directions.
FRAME_CODES = {
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
}
FRAME_TYPES = {code: name for name, code in FRAME_CODES.items()}

ROOM_SLUG_RE = re.compile(r"^[-a-zA-Z0-9_]{1,64}$")


class ChatError(Exception):
    """A request the server refuses; becomes an ``error`` frame with ``code``."""

    def __init__(self, code, message, **extra):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


# --- inbound -----------------------------------------------------------------


@dataclass(frozen=True)
class ClientFrame:
    type: str
    ref: str | None = None
    fields: dict = field(default_factory=dict)

    def __getitem__(self, name):
        return self.fields[name]

    def get(self, name, default=None):
        return self.fields.get(name, default)


def _room(value):
    if not isinstance(value, str) or not ROOM_SLUG_RE.match(value):
        raise ValueError("must be a room slug (letters, digits, - and _)")
    return value


def _seq(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be a whole number of 0 or more")
    return value


def _id(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a positive whole number")
    return value


def _limit(value):
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not (1 <= value <= HISTORY_MAX_LIMIT)
    ):
        raise ValueError(f"must be a whole number from 1 to {HISTORY_MAX_LIMIT}")
    return value


def _body(value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a string of 1 to {MAX_BODY_CHARS} characters")
    if len(value) > MAX_BODY_CHARS:
        raise ChatError(TOO_LARGE, f"body is longer than {MAX_BODY_CHARS} characters")
    return value


def _client_msg_id(value):
    if not isinstance(value, str) or not (1 <= len(value) <= MAX_ID_CHARS):
        raise ValueError(f"must be a string of 1 to {MAX_ID_CHARS} characters")
    return value


def _username(value):
    if not isinstance(value, str) or not (1 <= len(value) <= 150):
        raise ValueError("must be a username")
    return value


# type -> {field: (validator, required)}; fields not listed are ignored.
CLIENT_FRAMES = {
    "join": {"room": (_room, True), "since": (_seq, False)},
    "leave": {"room": (_room, True)},
    "send": {
        "room": (_room, True),
        "body": (_body, True),
        "client_msg_id": (_client_msg_id, True),
    },
    "history": {
        "room": (_room, True),
        "before": (_seq, False),
        "limit": (_limit, False),
    },
    "typing": {"room": (_room, True)},
    "edit": {"room": (_room, True), "id": (_id, True), "body": (_body, True)},
    "delete": {"room": (_room, True), "id": (_id, True)},
    "read": {"room": (_room, True), "seq": (_seq, True)},
    "dm": {
        "to": (_username, True),
        "body": (_body, True),
        "client_msg_id": (_client_msg_id, True),
    },
    "ping": {},
}


def parse_json(text):
    """Parse a JSON text frame from a client."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        raise ChatError(BAD_REQUEST, "frame is not valid JSON") from None
    return parse_object(data)


def parse_binary(data):
    """Parse a ``chat.v1.bin`` frame: 4-byte big-endian action code, then JSON."""
    if len(data) < 4:
        raise ChatError(BAD_REQUEST, "binary frame is shorter than its 4-byte code")
    (code,) = struct.unpack(">I", data[:4])
    frame_type = FRAME_TYPES.get(code)
    if frame_type is None:
        raise ChatError(BAD_REQUEST, f"unknown action code {code}")
    payload = data[4:]
    try:
        obj = json.loads(payload) if payload.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise ChatError(BAD_REQUEST, "binary frame payload is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ChatError(BAD_REQUEST, "frame must be a JSON object")
    obj["type"] = frame_type
    return parse_object(obj)


def parse_object(data):
    if not isinstance(data, dict):
        raise ChatError(BAD_REQUEST, "frame must be a JSON object")
    ref = data.get("ref")
    if ref is not None and not (isinstance(ref, str) and len(ref) <= MAX_REF_CHARS):
        raise ChatError(BAD_REQUEST, f"ref must be a string of at most {MAX_REF_CHARS}")
    frame_type = data.get("type")
    schema = CLIENT_FRAMES.get(frame_type) if isinstance(frame_type, str) else None
    if schema is None:
        raise ChatError(BAD_REQUEST, f"unknown frame type {frame_type!r}", ref=ref)
    fields = {}
    for name, (validate, required) in schema.items():
        value = data.get(name)
        if value is None:
            if required:
                raise ChatError(
                    BAD_REQUEST, f"{frame_type}: {name} is required", ref=ref
                )
            continue
        try:
            fields[name] = validate(value)
        except ValueError as exc:
            raise ChatError(
                BAD_REQUEST, f"{frame_type}: {name} {exc}", ref=ref
            ) from None
        except ChatError as exc:
            exc.extra.setdefault("ref", ref)
            raise
    return ClientFrame(type=frame_type, ref=ref, fields=fields)


# --- outbound ----------------------------------------------------------------


def timestamp(value: datetime | None):
    """ISO 8601 in UTC with a Z, or None."""
    if value is None:
        return None
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _with_ref(frame, ref):
    if ref is not None:
        frame["ref"] = ref
    return frame


def user_payload(user):
    return {"id": user.pk, "username": user.get_username()}


def message_payload(message, room_slug, author):
    """The shared shape of a stored message (``message`` and ``history``)."""
    deleted = message.deleted_at is not None
    return {
        "room": room_slug,
        "id": message.pk,
        "seq": message.seq,
        "user": {"id": author.pk, "username": author.get_username()},
        "body": "" if deleted else message.body,
        "created_at": timestamp(message.created_at),
        "client_msg_id": message.client_msg_id,
        "edited_at": timestamp(message.edited_at),
        "deleted": deleted,
    }


def hello(*, connection_id, user, heartbeat):
    return {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "connection_id": connection_id,
        "user": user_payload(user),
        "heartbeat": heartbeat,
    }


def joined(*, room, online, read_seq, ref):
    frame = {
        "type": "joined",
        "room": room.slug,
        "title": room.title,
        "last_seq": room.last_seq,
        "online": online,
        "read_seq": read_seq,
        "private": room.is_private,
        "direct": room.is_direct,
        "closed": room.is_closed,
    }
    return _with_ref(frame, ref)


def recovered(*, room_slug, complete):
    return {"type": "recovered", "room": room_slug, "complete": complete}


def left(*, room_slug, ref):
    return _with_ref({"type": "left", "room": room_slug}, ref)


def message(payload):
    return {"type": "message", **payload}


def ack(*, ref, room_slug, message):
    return _with_ref(
        {
            "type": "ack",
            "room": room_slug,
            "client_msg_id": message.client_msg_id,
            "id": message.pk,
            "seq": message.seq,
        },
        ref,
    )


def history(*, room_slug, messages, has_more, ref):
    frame = {"type": "history", "room": room_slug, "messages": messages}
    frame["has_more"] = has_more
    return _with_ref(frame, ref)


def typing(*, room_slug, username):
    return {"type": "typing", "room": room_slug, "user": username}


def presence(*, room_slug, username, status):
    return {"type": "presence", "room": room_slug, "user": username, "status": status}


def message_edited(*, room_slug, message):
    return {
        "type": "message_edited",
        "room": room_slug,
        "id": message.pk,
        "seq": message.seq,
        "body": message.body,
        "edited_at": timestamp(message.edited_at),
    }


def message_deleted(*, room_slug, message):
    return {
        "type": "message_deleted",
        "room": room_slug,
        "id": message.pk,
        "seq": message.seq,
    }


def removed(*, room_slug, reason):
    return {"type": "removed", "room": room_slug, "reason": reason}


def push(*, event, data):
    return {"type": "push", "event": event, "data": data}


def pong(*, ref):
    return _with_ref({"type": "pong"}, ref)


def error(*, code, message, ref=None, **extra):
    frame = {"type": "error", "code": code, "message": message, **extra}
    return _with_ref(frame, ref)


def error_from(exc: ChatError, ref=None):
    extra = dict(exc.extra)
    ref = extra.pop("ref", None) or ref
    return error(code=exc.code, message=exc.message, ref=ref, **extra)


class Encoded:
    """One outbound frame serialized once, ready for any number of sockets."""

    __slots__ = ("type", "text", "_binary", "prepared")

    def __init__(self, frame_type, text):
        self.type = frame_type
        self.text = text
        self._binary = None
        self.prepared = {}  # per framing, the server's ready-to-write form

    @property
    def binary(self):
        if self._binary is None:
            # The text starts with the type (frames are built with it first),
            # so the binary payload is the same JSON with that member cut out.
            head = '{"type":' + _dumps(self.type)
            rest = self.text[len(head) :]
            payload = "{" + rest[1:] if rest.startswith(",") else "{}"
            code = struct.pack(">I", FRAME_CODES[self.type])
            self._binary = code + payload.encode()
        return self._binary


def _dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def encode(frame):
    """Serialize an outbound frame once."""
    return Encoded(frame["type"], _dumps(frame))
