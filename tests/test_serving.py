"""The pieces that sit beside the ASGI server."""

import functools

from daphne.server import Server

from chat import protocol, serving


def test_daphne_wire_is_the_protocol_behind_daphnes_send():
    server = Server.__new__(Server)
    wire = object()
    send = functools.partial(server.handle_reply, wire)
    assert serving.daphne_wire(send) is wire


def test_no_daphne_wire_under_another_server():
    async def send(message):
        return None

    assert serving.daphne_wire(send) is None
    assert serving.daphne_wire(functools.partial(send)) is None


def test_prepared_message_is_built_once_per_framing():
    encoded = protocol.encode(protocol.pong(ref="r"))
    text = serving.prepared(encoded, False)
    assert serving.prepared(encoded, False) is text
    # Unmasked server frames: FIN and opcode (text 1, binary 2), length, payload.
    assert text.payloadHybi == b'\x81\x19{"type":"pong","ref":"r"}'
    binary = serving.prepared(encoded, True)
    assert binary.payloadHybi == b'\x82\x0f\x00\x00\x00\x0c{"ref":"r"}'


class FakeTcpTransport:
    """The attributes of a Twisted TCP connection that ``write_prepared`` reads."""

    def __init__(self, sock):
        self.socket = sock
        self.connected = True
        self.disconnecting = False
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataBuffer = []
        self.written = []

    def write(self, data):
        self.written.append(bytes(data))


class FakeWire:
    def __init__(self, transport):
        self.transport = transport


def test_prepared_frame_goes_straight_to_an_idle_socket():
    import socket

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    transport = FakeTcpTransport(ours)
    message = serving.prepared(protocol.encode(protocol.pong(ref="r")), False)
    serving.write_prepared(FakeWire(transport), message)
    assert theirs.recv(100) == message.payloadHybi
    assert transport.written == []
    ours.close()
    theirs.close()


def test_prepared_frame_queues_behind_pending_data():
    import socket

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    transport = FakeTcpTransport(ours)
    transport._tempDataBuffer = [b"earlier"]
    message = serving.prepared(protocol.encode(protocol.pong(ref="r")), False)
    serving.write_prepared(FakeWire(transport), message)
    assert transport.written == [message.payloadHybi]
    theirs.setblocking(False)
    try:
        assert theirs.recv(100) == b""
    except BlockingIOError:
        pass  # nothing was sent around Twisted's queue
    ours.close()
    theirs.close()


class FakeHttpChannel:
    """Twisted's HTTP channel that did the upgrade: a producer with a timeout."""

    timeout = 43200

    def setTimeout(self, period):
        self.timeout = period


class FakeRequest:
    path = "/ws/"
    headers = {"cookie": "sessionid=secret"}


class FakeProducerTransport:
    def __init__(self, producer):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


class FakeOpenSocket:
    """An open daphne socket's protocol, as far as ``release_handshake`` goes."""

    STATE_OPEN = 3
    state = 3

    def __init__(self, channel):
        self.transport = FakeProducerTransport(channel)
        self.request = FakeRequest()
        self.clean_headers = [(b"cookie", b"sessionid=secret")]
        self.http_request_data = b"GET /ws/ HTTP/1.1\r\n..."
        self.http_headers = {"cookie": "sessionid=secret"}
        self.state = 3
        self.autoPingInterval = 0
        self.closedByMe = False
        self.utf8validator = object()


def test_release_handshake_drops_the_upgrade_request_and_the_http_channel():
    channel = FakeHttpChannel()
    wire = FakeOpenSocket(channel)
    serving.release_handshake(wire)
    state = vars(wire)
    for name in ("clean_headers", "http_request_data", "http_headers"):
        assert name not in state
    assert wire.request.path == "/ws/"
    assert not hasattr(wire.request, "headers")
    assert channel.timeout is None
    assert wire.transport.producer is None


def test_scalars_alike_for_every_socket_move_to_the_class():
    first, second = FakeOpenSocket(FakeHttpChannel()), FakeOpenSocket(FakeHttpChannel())
    second.closedByMe = True
    serving.release_handshake(first)
    serving.release_handshake(second)
    # Equal to the class's value (state) or made the class's by the first
    # socket (autoPingInterval, closedByMe): left to the class.
    assert set(vars(first)) == {"transport", "request", "utf8validator"}
    assert (first.state, first.autoPingInterval, first.closedByMe) == (3, 0, False)
    # A value of its own stays the socket's; assigning one later works as before.
    assert vars(second)["closedByMe"] is True
    first.state = 5
    assert (first.state, second.state, FakeOpenSocket.state) == (5, 3, 3)
