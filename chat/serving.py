"""Everything that reaches into daphne, autobahn and Twisted internals.

- Daphne 4.2 drops the reason of ``websocket.close`` and refuses close codes
  other than 1000 and 3000-4999 (1001 included); ``patch_daphne_close`` makes
  it send any code with its reason.
"""

import functools
import logging

logger = logging.getLogger(__name__)


def patch_daphne_close():
    """Let daphne close sockets with any code and a reason."""
    try:
        from autobahn.util import encode_truncate
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:
        return
    if getattr(WebSocketProtocol, "_chat_close_patched", False):
        return
    original = WebSocketProtocol.handle_reply

    def handle_reply(self, message):
        if message.get("type") == "websocket.close" and self.state == self.STATE_OPEN:
            code = message.get("code") or 1000
            reason = message.get("reason") or None
            reason_utf8 = encode_truncate(reason, 123) if reason else None
            self.sendCloseFrame(code=code, reasonUtf8=reason_utf8, isReply=False)
            return
        return original(self, message)

    WebSocketProtocol.handle_reply = handle_reply
    WebSocketProtocol._chat_close_patched = True


def daphne_wire(send):
    """The autobahn protocol behind an ASGI ``send`` under daphne, else None.

    Writing a frame prepared once straight to it skips, per socket, daphne's
    message checks, the UTF-8 encoding and the frame header building.
    """
    if isinstance(send, functools.partial) and send.args:
        owner = getattr(send.func, "__self__", None)
        if type(owner).__module__ == "daphne.server":
            return send.args[0]
    return None


# What daphne and autobahn keep of the HTTP upgrade request for a socket's whole
# life, though nothing reads it once the socket is open.
_HANDSHAKE_LEFTOVERS = (
    "clean_headers",
    "http_headers",
    "http_request_data",
    "http_response_data",
    "http_status_line",
    "http_request_uri",
    "http_request_params",
)
_SCALARS = (type(None), bool, int, float, str, bytes)
_MISSING = object()


class _HandshakeRequest:
    """All daphne reads of an open socket's request: its path, for logging."""

    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path


def release_handshake(wire):
    """Let go of what an open daphne socket keeps of its handshake, and compact it.

    About 6 KiB per idle socket: the request's headers (three copies), the raw
    request and response, and twisted's HTTP channel that did the upgrade, which
    stays referenced as the socket's producer and by a 12-hour timeout call.
    """
    state = wire.__dict__
    for name in _HANDSHAKE_LEFTOVERS:
        state.pop(name, None)
    request = state.get("request")
    if request is not None:
        wire.request = _HandshakeRequest(request.path)
    transport = wire.transport
    channel = getattr(transport, "producer", None)
    if channel is not None and hasattr(channel, "setTimeout"):
        channel.setTimeout(None)  # cancels the HTTP channel's pending timeout
        transport.unregisterProducer()
    _share_scalar_attributes(wire)


def _share_scalar_attributes(instance):
    """Move attributes every instance holds alike to the class, once.

    Autobahn copies ~30 settings from its factory into every protocol and sets
    ~40 flags and counters, nearly all the same for every open socket; a dict of
    100+ keys per socket. A scalar equal to the class's value is left to the
    class (an assignment later makes it the instance's again, as before); one
    the class lacks becomes the class's, since every open socket has it.
    """
    cls = type(instance)
    state = instance.__dict__
    for name, value in list(state.items()):
        if type(value) not in _SCALARS:
            continue
        shared = getattr(cls, name, _MISSING)
        if shared is _MISSING:
            setattr(cls, name, value)
            shared = value
        if type(shared) is type(value) and shared == value:
            del state[name]
    # A dict never shrinks: a copy is sized for what is left.
    instance.__dict__ = dict(state)


def prepared(encoded, binary):
    """The autobahn prepared message of an encoded frame, built once and cached."""
    from autobahn.websocket.protocol import PreparedMessage

    cached = encoded.prepared.get(binary)
    if cached is None:
        payload = encoded.binary if binary else encoded.text.encode()
        cached = PreparedMessage(payload, binary, applyMask=False, doNotCompress=True)
        encoded.prepared[binary] = cached
    return cached


def write_prepared(wire, message):
    """Write a prepared frame to a daphne socket, straight to the kernel if we can.

    Twisted buffers every write until the event loop's next turn and toggles the
    socket's epoll registration around it: two system calls and a loop pass per
    frame. When nothing is queued ahead of this frame on a plain TCP socket, send
    it now; whatever the kernel does not take goes through Twisted as usual.
    """
    data = message.payloadHybi
    transport = wire.transport
    if _can_send_now(transport):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # Twisted's own write finds the broken connection
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _can_send_now(transport):
    return (
        getattr(transport, "socket", None) is not None
        and not getattr(transport, "TLS", False)
        and getattr(transport, "connected", False)
        and not getattr(transport, "disconnecting", True)
        and not getattr(transport, "_tempDataBuffer", True)
        and len(getattr(transport, "dataBuffer", b"x"))
        == getattr(transport, "offset", -1)
    )
