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
