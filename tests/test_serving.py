"""The pieces that sit beside the ASGI server."""

import functools

from channels.sessions import InstanceSessionWrapper
from daphne.server import Server

from chat import protocol, serving


def test_daphne_wire_is_found_behind_the_session_middleware():
    server = Server.__new__(Server)
    wire = object()
    send = functools.partial(server.handle_reply, wire)
    assert serving.daphne_wire(send) is wire
    wrapped = InstanceSessionWrapper({"cookies": {}}, send)
    assert serving.daphne_wire(wrapped.send) is wire


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
