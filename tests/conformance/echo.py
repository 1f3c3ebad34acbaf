"""An echo consumer that writes the way ``ChatConsumer._write`` does.

With the fast path on, every message goes back as an autobahn prepared frame
written straight to the daphne socket (``serving.prepared``, ``write_prepared``);
with ``CHAT_FAST_PATH=0``, through plain ASGI (``websocket.send``).
"""

from channels.generic.websocket import AsyncWebsocketConsumer

from chat import serving


class Echoed:
    """A received message in the shape ``serving.prepared`` reads (as ``Encoded``)."""

    __slots__ = ("text", "binary", "prepared")

    def __init__(self, *, text: str = "", binary: bytes = b"") -> None:
        self.text = text
        self.binary = binary
        self.prepared: dict[int, object] = {}

    def wire(self, framing: int) -> tuple[bytes, bool]:
        """As ``Encoded.wire`` for the uncompressed framings (0 text, 1 binary)."""
        return (self.binary, True) if framing else (self.text.encode(), False)


class EchoConsumer(AsyncWebsocketConsumer):
    """Send every text and binary message back as it came."""

    wire = None  # the daphne socket when the fast path is on

    async def connect(self):
        await self.accept()
        self.wire = serving.daphne_wire(self.base_send)
        if self.wire is not None:
            serving.release_handshake(self.wire)

    async def receive(self, text_data=None, bytes_data=None):
        wire = self.wire
        if wire is not None:
            # As ChatConsumer._write: a socket closing takes no more frames.
            if wire.state == wire.STATE_OPEN:
                binary = bytes_data is not None
                echoed = Echoed(text=text_data or "", binary=bytes_data or b"")
                serving.write_prepared(wire, serving.prepared(echoed, binary))
            return
        if bytes_data is not None:
            await self.send(bytes_data=bytes_data)
        else:
            await self.send(text_data=text_data)
