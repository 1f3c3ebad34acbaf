"""Everything that reaches into daphne, autobahn and Twisted internals.

- The fast path: a frame is framed once for all the sockets it goes to and
  written straight to each socket (``daphne_wire``, ``prepared``,
  ``write_prepared``); an open socket lets go of its handshake
  (``release_handshake``).
- Back-pressure: a ``SendBuffer`` per socket, registered as the transport's
  streaming producer, holds the frames the client is not reading fast enough
  and tells when they pass ``CHAT_SEND_BUFFER_BYTES``; on both paths.
- Daphne 4.2 drops the reason of ``websocket.close``, refuses close codes
  other than 1000 and 3000-4999 (1001 included) and drops an empty message of
  ``websocket.send``; ``patch_daphne_replies`` makes it send any code with its
  reason, and an empty message as an empty frame.

Both are written for the versions in ``WRITTEN_FOR``, the ones the lock pins.
``configure`` (chatsite.asgi calls it) checks them once: on other versions the
fast path and the send buffer are off and daphne's replies are left alone, with
a warning. The setting ``CHAT_FAST_PATH`` (off: ``CHAT_FAST_PATH=0``) turns the
fast path off too; the send buffer stays.
"""

import collections
import functools
import logging
from dataclasses import dataclass
from importlib import metadata

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer  # type: ignore[import-untyped]

logger = logging.getLogger(__name__)

# The versions these internals were read in; requirements.in pins the same.
WRITTEN_FOR = {
    "daphne": "4.2.3",
    "autobahn": "26.11.1",
    "twisted": "26.10.0",
    "txaio": "26.6.1",
}
# The reply patch touches only these; the fast path touches all four.
CLOSE_PATCH_PACKAGES = ("daphne", "autobahn")


@dataclass(frozen=True)
class Decision:
    """What the serving layer does with the versions installed, and why."""

    fast_path: bool
    close_patch: bool
    # The versions are the ones written for: a socket's transport can be reached.
    internals: bool
    summary: str  # the INFO line: which path is in use and why
    warning: str | None = None


# Set once by configure(); until then (tests on WebsocketCommunicator, an entry
# point other than chatsite.asgi) the fast path is off.
_decision: Decision | None = None


def installed_versions(
    names: tuple[str, ...] = tuple(WRITTEN_FOR),
) -> dict[str, str | None]:
    """The installed version of each package of ``names``, None when missing."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def version_differences(
    installed: dict[str, str | None], names: tuple[str, ...] = tuple(WRITTEN_FOR)
) -> list[str]:
    """How the ``installed`` versions of ``names`` differ from ``WRITTEN_FOR``."""
    differences = []
    for name in names:
        wanted, found = WRITTEN_FOR[name], installed.get(name)
        if found is None:
            differences.append(f"{name} not installed, written for {wanted}")
        elif found != wanted:
            differences.append(f"{name} {found} installed, written for {wanted}")
    return differences


def decide(*, enabled: bool, installed: dict[str, str | None]) -> Decision:
    """The ``Decision`` for a ``CHAT_FAST_PATH`` of ``enabled`` and these versions."""
    differences = version_differences(installed)
    close_differences = version_differences(installed, CLOSE_PATCH_PACKAGES)
    if not enabled:
        summary = "fast path off: CHAT_FAST_PATH=0"
    elif differences:
        summary = "fast path off: " + "; ".join(differences)
    else:
        versions = ", ".join(f"{name} {installed[name]}" for name in WRITTEN_FOR)
        summary = f"fast path on ({versions})"
    return Decision(
        fast_path=enabled and not differences,
        close_patch=not close_differences,
        internals=not differences,
        summary=summary,
        warning=_warning(enabled, differences, close_differences),
    )


def _warning(enabled, differences, close_differences):
    """What a version mismatch costs and its fix; None when it costs nothing."""
    lost, fix = [], "install the lock: pip install -r requirements.txt"
    if differences and enabled:
        lost.append("the fast path is off (every frame goes through plain ASGI)")
        fix += ", or set CHAT_FAST_PATH=0 to accept the plain path"
    if differences:
        lost.append(
            "slow readers are not cut off (CHAT_SEND_BUFFER_BYTES is not applied)"
        )
    if close_differences:
        lost.append(
            "daphne's close is not patched (close codes other than 1000 and "
            "3000-4999, and close reasons, may be lost)"
        )
    if not lost:
        return None
    return (
        f"Not the versions chat.serving was written for ({'; '.join(differences)}): "
        f"{', '.join(lost[:-1]) + ' and ' if len(lost) > 1 else ''}{lost[-1]}. "
        f"To fix, {fix}."
    )


def configure() -> Decision:
    """Check the installed versions once: log the path in use, patch daphne."""
    global _decision
    if _decision is None:
        from django.conf import settings

        decision = decide(
            enabled=settings.CHAT_FAST_PATH, installed=installed_versions()
        )
        if decision.warning:
            logger.warning(decision.warning)
        logger.info(decision.summary)
        if decision.close_patch:
            patch_daphne_replies()
        if decision.fast_path:
            skip_unlogged_formatting()
        _decision = decision
    return _decision


def fast_path_on() -> bool:
    """Whether ``configure`` found the fast path wanted and its versions installed."""
    return _decision is not None and _decision.fast_path


def patch_daphne_replies():
    """Let daphne close sockets with any code and a reason, and send empty messages."""
    try:
        from autobahn.util import encode_truncate
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:
        return
    if getattr(WebSocketProtocol, "_chat_replies_patched", False):
        return
    original = WebSocketProtocol.handle_reply

    def handle_reply(self, message):
        kind = message.get("type")
        if kind == "websocket.close" and self.state == self.STATE_OPEN:
            code = message.get("code") or 1000
            reason = message.get("reason") or None
            reason_utf8 = encode_truncate(reason, 123) if reason else None
            self.sendCloseFrame(code=code, reasonUtf8=reason_utf8, isReply=False)
            return
        if kind == "websocket.send" and self.state == self.STATE_OPEN:
            # Daphne sends a payload only when it is truthy: "" and b"" vanish.
            binary = empty_message_binary(message)
            if binary is not None:
                self.sendMessage(b"", isBinary=binary)
                return
        return original(self, message)

    WebSocketProtocol.handle_reply = handle_reply
    WebSocketProtocol._chat_replies_patched = True


def skip_unlogged_formatting():
    """Stop autobahn pretty-printing its options for a debug line nobody logs.

    Every new socket's ``_connectionMade`` formats all of its ~40 options with
    ``pprint.pformat`` for a ``log.debug`` call, at any log level: a few per
    cent of a handshake's CPU. Autobahn's module then formats only while txaio
    logs at debug (or trace); otherwise it hands the log call a short note.
    """
    try:
        import txaio
        from autobahn.websocket import protocol
    except ImportError:
        return
    if getattr(protocol, "_chat_formatting_patched", False):
        return
    original = protocol.pformat

    @functools.wraps(original)
    def pformat(value, *args, **kwargs):
        level = txaio.get_global_log_level()  # type: ignore[attr-defined]
        if level in ("debug", "trace"):
            return original(value, *args, **kwargs)
        return "(not formatted: autobahn logs below debug)"

    protocol.pformat = pformat  # type: ignore[assignment]
    protocol._chat_formatting_patched = True  # type: ignore[attr-defined]


def empty_message_binary(message):
    """Whether a ``websocket.send`` of one empty payload is binary; None otherwise.

    None too for a message with both ``text`` and ``bytes``: daphne's to judge.
    """
    text, data = message.get("text"), message.get("bytes")
    if text is None and data is not None and not data:
        return True
    if data is None and text is not None and not text:
        return False
    return None


def daphne_socket(send):
    """The autobahn protocol behind an ASGI ``send`` under daphne, else None.

    None too on versions the internals were not read in.
    """
    if _decision is None or not _decision.internals:
        return None
    if isinstance(send, functools.partial) and send.args:
        owner = getattr(send.func, "__self__", None)
        if type(owner).__module__ == "daphne.server":
            return send.args[0]
    return None


def daphne_wire(send):
    """The daphne socket to write prepared frames to (the fast path), else None.

    Writing a frame prepared once straight to it skips, per socket, daphne's
    message checks, the UTF-8 encoding and the frame header building. None
    when the fast path is off: the consumer then sends through ASGI.
    """
    return daphne_socket(send) if fast_path_on() else None


def transport_waiting(transport):
    """Bytes Twisted holds for ``transport``, not yet handed to the kernel."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@implementer(IPushProducer)
class SendBuffer:
    """The frames of one daphne socket that wait for its client to read them.

    Twisted's producer/consumer back-pressure: registered as the transport's
    streaming producer, it is paused when Twisted holds more than 64 KiB for the
    socket, and resumed once that is written. While paused, or while frames
    wait, the consumer ``hold``s new frames here instead of writing them;
    ``resume`` (the consumer's) writes them out again. ``waiting`` counts what
    waits here and in Twisted: past ``limit`` the client is too slow a reader.
    A new frame waits here while ``paused`` or ``frames`` (behind the others).
    """

    __slots__ = ("wire", "transport", "limit", "resume", "frames", "size", "paused")

    # Seconds a closed slow reader has to read what Twisted still holds and the
    # close frame before the connection is dropped (autobahn's default: 1).
    CLOSE_GRACE_SECONDS = 5

    def __init__(self, wire, *, limit, resume):
        self.wire = wire
        self.transport = wire.transport
        self.limit = limit
        self.resume = resume  # called, with no argument, once Twisted has written
        self.frames = None  # a deque once a frame waits: most sockets never do
        self.size = 0
        self.paused = False
        # Twisted pauses its producer past bufferSize (64 KiB): below half the
        # limit, so that frames wait here, counted, before the limit is near.
        if limit < 2 * self.transport.bufferSize:
            self.transport.bufferSize = max(limit // 2, 1)
        if self.transport.producer is not None:
            # Daphne's HTTP channel, which did the upgrade; not ours to keep.
            self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self.resume()

    def stopProducing(self):
        """The connection is gone: let go of everything waiting."""
        self.clear()
        self.resume = _nothing

    @property
    def waiting(self):
        return self.size + transport_waiting(self.transport)

    def hold(self, frame, size):
        """Keep ``frame`` of ``size`` bytes to write later; False past the limit."""
        if self.waiting + size > self.limit:
            return False
        if self.frames is None:
            self.frames = collections.deque()
        self.frames.append((frame, size))
        self.size += size
        return True

    def take(self):
        """The next frame to write now, or None (none waits, or Twisted is full)."""
        if self.paused or not self.frames:
            return None
        frame, size = self.frames.popleft()
        self.size -= size
        return frame

    def clear(self):
        self.frames = None
        self.size = 0

    def release(self):
        """Let go of the waiting frames before a close; the rest goes with it.

        Twisted keeps what it holds (at most half the limit and a frame) until
        the client reads it and the close frame, or the grace runs out and the
        connection is dropped.
        """
        self.clear()
        self.wire.closeHandshakeTimeout = self.CLOSE_GRACE_SECONDS


def _nothing():
    pass


def frame_size(encoded, framing):
    """The bytes on the wire of an encoded frame (header included)."""
    return len(prepared(encoded, framing).payloadHybi)


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


def prepared(encoded, framing):
    """The autobahn prepared message of an encoded frame in a framing (see
    ``protocol.framing``), built once and cached: compressed once, too."""
    from autobahn.websocket.protocol import PreparedMessage

    cached = encoded.prepared.get(framing)
    if cached is None:
        payload, binary = encoded.wire(framing)
        cached = PreparedMessage(payload, binary, applyMask=False, doNotCompress=True)
        encoded.prepared[framing] = cached
    return cached


def write_prepared(wire, message):
    """Write a prepared frame to a daphne socket, straight to the kernel if we can."""
    write_bytes(wire, message.payloadHybi)


class Frames:
    """Encoded frames going to many sockets together: their wire bytes, joined
    once per framing however many sockets get them."""

    __slots__ = ("frames", "_payloads")

    def __init__(self, frames):
        self.frames = frames
        self._payloads = {}

    def payload(self, framing):
        payload = self._payloads.get(framing)
        if payload is None:
            payload = b"".join(prepared(e, framing).payloadHybi for e in self.frames)
            self._payloads[framing] = payload
        return payload


def write_bytes(wire, data):
    """Write whole WebSocket frames to a daphne socket, straight to the kernel.

    Twisted buffers every write until the event loop's next turn and toggles the
    socket's epoll registration around it: two system calls and a loop pass per
    frame. When nothing is queued ahead of this frame on a plain TCP socket, send
    it now; whatever the kernel does not take goes through Twisted as usual.
    Several frames in one call cost one system call.
    """
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
