"""chat.serving: the version guard, and the fast path through real daphne sockets.

The socket tests start daphne processes of their own (one with the fast path on,
one with ``CHAT_FAST_PATH=0``) on the test database and talk to them through
real WebSocket clients (``ChatClient``; with ``record=True`` where the bytes on
the wire are the point). Every test commits its data (``transaction=True``) so
the server processes see it.
"""

import asyncio
import functools
import gzip
import json
import re
import signal
import struct
import time

import pytest
from daphne.server import Server
from websockets.asyncio.client import connect

from chat import protocol, serving
from chat.client import ChatClosed
from tests.servers import (
    ROOT,
    DaphneServer,
    RedisServer,
    shadow_distribution,
    this_process_uses_redis,
)
from tests.test_multiprocess import room_create, stored_message, user_with_key

TIMEOUT = 5  # seconds to wait for what should come
WRITTEN_FOR = dict(serving.WRITTEN_FOR)
FAST_PATH_ON = (
    "fast path on (daphne 4.2.3, autobahn 26.11.1, twisted 26.10.0, txaio 26.6.1)"
)
FAST_PATH_OFF = "fast path off: CHAT_FAST_PATH=0"
REPLACED = (4409, "replaced by a newer connection with the same device key")


# --- the version guard ---------------------------------------------------------


def test_the_lock_pins_the_versions_the_fast_path_was_written_for():
    lock = (ROOT / "requirements.txt").read_text()
    pins = dict(re.findall(r"^([a-z0-9-]+)==(\S+)", lock, flags=re.MULTILINE))
    assert {name: pins.get(name) for name in WRITTEN_FOR} == WRITTEN_FOR


def test_the_written_for_versions_turn_the_fast_path_and_the_close_patch_on():
    decision = serving.decide(enabled=True, installed=WRITTEN_FOR)
    assert decision == serving.Decision(
        fast_path=True,
        close_patch=True,
        internals=True,
        summary=FAST_PATH_ON,
        warning=None,
    )


def test_chat_fast_path_0_turns_the_fast_path_off_and_keeps_the_close_patch():
    decision = serving.decide(enabled=False, installed=WRITTEN_FOR)
    assert decision == serving.Decision(
        fast_path=False,
        close_patch=True,
        internals=True,
        summary=FAST_PATH_OFF,
        warning=None,
    )


def test_another_twisted_turns_the_fast_path_off_with_a_warning_naming_the_fix():
    installed = {**WRITTEN_FOR, "twisted": "25.5.0"}
    decision = serving.decide(enabled=True, installed=installed)
    assert decision == serving.Decision(
        fast_path=False,
        close_patch=True,
        internals=False,
        summary="fast path off: twisted 25.5.0 installed, written for 26.10.0",
        warning=(
            "Not the versions chat.serving was written for (twisted 25.5.0 "
            "installed, written for 26.10.0): the fast path is off (every frame "
            "goes through plain ASGI) and slow readers are not cut off "
            "(CHAT_SEND_BUFFER_BYTES is not applied). To fix, install the lock: "
            "pip install -r requirements.txt, or set CHAT_FAST_PATH=0 to accept the "
            "plain path."
        ),
    )


def test_with_chat_fast_path_0_another_twisted_costs_the_send_buffer_only():
    installed = {**WRITTEN_FOR, "twisted": "25.5.0", "txaio": None}
    decision = serving.decide(enabled=False, installed=installed)
    assert (decision.fast_path, decision.close_patch) == (False, True)
    assert decision.summary == FAST_PATH_OFF
    assert decision.warning == (
        "Not the versions chat.serving was written for (twisted 25.5.0 installed, "
        "written for 26.10.0; txaio not installed, written for 26.6.1): slow "
        "readers are not cut off (CHAT_SEND_BUFFER_BYTES is not applied). To fix, "
        "install the lock: pip install -r requirements.txt."
    )


def test_another_daphne_leaves_its_close_alone_and_says_what_is_lost():
    installed = {**WRITTEN_FOR, "daphne": "4.3.0", "txaio": None}
    decision = serving.decide(enabled=True, installed=installed)
    differences = (
        "daphne 4.3.0 installed, written for 4.2.3; "
        "txaio not installed, written for 26.6.1"
    )
    assert decision == serving.Decision(
        fast_path=False,
        close_patch=False,
        internals=False,
        summary=f"fast path off: {differences}",
        warning=(
            f"Not the versions chat.serving was written for ({differences}): the "
            "fast path is off (every frame goes through plain ASGI), slow readers "
            "are not cut off (CHAT_SEND_BUFFER_BYTES is not applied) and daphne's "
            "close is not patched (close codes other than 1000 and 3000-4999, and "
            "close reasons, may be lost). To fix, install the lock: pip install -r "
            "requirements.txt, or set CHAT_FAST_PATH=0 to accept the plain path."
        ),
    )


def test_with_chat_fast_path_0_another_autobahn_still_warns_of_the_close():
    installed = {**WRITTEN_FOR, "autobahn": "27.1.0", "twisted": "25.5.0"}
    decision = serving.decide(enabled=False, installed=installed)
    assert (decision.fast_path, decision.close_patch) == (False, False)
    assert decision.summary == FAST_PATH_OFF
    # The fast path is not named: it is off anyway.
    assert decision.warning == (
        "Not the versions chat.serving was written for (autobahn 27.1.0 installed, "
        "written for 26.11.1; twisted 25.5.0 installed, written for 26.10.0): slow "
        "readers are not cut off (CHAT_SEND_BUFFER_BYTES is not applied) and "
        "daphne's close is not patched (close codes other than 1000 and 3000-4999, "
        "and close reasons, may be lost). To fix, install the lock: pip install -r "
        "requirements.txt."
    )


def test_daphne_wire_is_the_protocol_behind_daphnes_send_with_the_fast_path_on():
    server = Server.__new__(Server)
    wire = object()
    send = functools.partial(server.handle_reply, wire)
    decision = serving.configure()  # chatsite.asgi, which conftest imports, did
    assert serving.daphne_wire(send) is (wire if decision.fast_path else None)


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


def test_autobahn_formats_its_options_only_when_it_logs_debug(monkeypatch):
    import txaio
    from autobahn.websocket import protocol as autobahn_protocol

    monkeypatch.setattr(autobahn_protocol, "pformat", autobahn_protocol.pformat)
    monkeypatch.delattr(autobahn_protocol, "_chat_formatting_patched", raising=False)
    serving.skip_unlogged_formatting()
    options = [("openHandshakeTimeout", 5, "WebSocketServerFactory")]
    monkeypatch.setattr(txaio, "get_global_log_level", lambda: "info")
    assert autobahn_protocol.pformat(options) == (
        "(not formatted: autobahn logs below debug)"
    )
    monkeypatch.setattr(txaio, "get_global_log_level", lambda: "debug")
    assert autobahn_protocol.pformat(options) == (
        "[('openHandshakeTimeout', 5, 'WebSocketServerFactory')]"
    )


# --- servers -------------------------------------------------------------------


def daphne_start(django_db_blocker, **env):
    # database_url() reads the test database's connection settings.
    with django_db_blocker.unblock():
        server = DaphneServer(extra_env=env, verbosity=0)
    return server.start()


@pytest.fixture(scope="module")
def daphnes(django_db_setup, django_db_blocker):
    """``{"on": …, "off": …}``: daphne with the fast path on, and with it off."""
    servers = {}
    try:
        servers["on"] = daphne_start(django_db_blocker)
        servers["off"] = daphne_start(django_db_blocker, CHAT_FAST_PATH="0")
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(params=["on", "off"])
def daphne(request, daphnes):
    """Each daphne of ``daphnes`` in turn; fails the test if it died during it."""
    server = daphnes[request.param]
    start = len(server.output())
    yield server
    print(f"--- daphne log during the test ---\n{server.output()[start:]}")
    assert server.alive(), f"daphne died:\n{server.output()}"


async def log_lines(server, timeout=TIMEOUT):
    """The server's log lines once it logged its serving summary."""
    deadline = time.monotonic() + timeout
    while "fast path " not in server.output():
        if time.monotonic() >= deadline:
            raise AssertionError(f"no serving summary logged:\n{server.output()}")
        await asyncio.sleep(0.05)
    return server.output().splitlines()


# --- data and clients ------------------------------------------------------------
#
# A test's sockets are ChatClients (the ``chat_client`` fixture: read in order,
# no reconnect, failures explained by the server's log). Where the point is the
# bytes on the wire (a text or a binary frame, gzip or not, the exact payload),
# which ChatClient decodes away, the socket records them (``record=True``):
# ``client.wire`` keeps every frame as it came, beside its decoded form in
# ``client.frames``.


def as_it_came(client, frame):
    """How ``frame``, received by ``client`` (``record=True``), came on the wire:
    the text (a text frame) or bytes (a binary frame) recorded beside it."""
    for frames, wire in zip(client.frames, client.wire, strict=True):
        for decoded, raw in zip(frames, wire, strict=True):
            if decoded is frame:
                return raw
    raise AssertionError(f"{client.name}: {frame} is not among its recorded frames")


async def next_raw(client):
    """The next frame ``client`` (``record=True``) got, decoded and as it came."""
    frame = await client.next_frame(timeout=TIMEOUT)
    return frame, as_it_came(client, frame)


def hello(frame, user):
    """The ``hello`` ``user`` should get, with the connection id it got."""
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9]+", frame.get("connection_id", ""))
    return {
        "type": "hello",
        "protocol": 1,
        "connection_id": frame["connection_id"],
        "user": {"id": user.pk, "username": user.username},
        "heartbeat": 30,
    }


def joined(slug, online, ref):
    return {
        "type": "joined",
        "ref": ref,
        "room": slug,
        "title": f"Room {slug}",
        "last_seq": 0,
        "online": online,
        "online_count": len(online),
        "read_seq": 0,
        "unread": 0,
        "mentions": 0,
        "private": False,
        "direct": False,
        "closed": False,
    }


# --- through real daphne sockets ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_start_up_logs_which_path_is_in_use(daphnes):
    assert FAST_PATH_ON in await log_lines(daphnes["on"])
    assert FAST_PATH_OFF in await log_lines(daphnes["off"])
    for server in daphnes.values():
        assert "Not the versions" not in server.output()


@pytest.mark.django_db(transaction=True)
async def test_frames_arrive_exactly_with_the_fast_path_on_and_off(daphne, chat_client):
    alice, alice_key = await user_with_key("alice")
    bob, bob_key = await user_with_key("bob")
    await room_create("plaza")
    on_alice = await chat_client(daphne, alice_key, name="alice")
    assert on_alice.hello == hello(on_alice.hello, alice)
    on_bob = await chat_client(daphne, bob_key, name="bob", record=True)
    assert on_bob.hello == hello(on_bob.hello, bob)

    await on_alice.send({"type": "join", "room": "plaza", "ref": "j1"})
    assert await on_alice.next_frame() == joined("plaza", ["alice"], "j1")
    await on_bob.send({"type": "join", "room": "plaza", "ref": "j2"})
    assert await on_bob.next_frame() == joined("plaza", ["alice", "bob"], "j2")
    presence = {"type": "presence", "room": "plaza", "user": "bob"}
    assert await on_alice.next_frame() == {**presence, "status": "online"}

    await on_alice.send(
        {
            "type": "send",
            "room": "plaza",
            "body": "hi both",
            "client_msg_id": "c-1",
            "ref": "s1",
        }
    )
    received = await on_bob.next_frame()
    message = await stored_message("plaza", 1)
    assert message["user"] == {"id": alice.pk, "username": "alice"}
    assert message["body"] == "hi both"
    assert received == message
    # The sender gets the ack and its own message, in either order.
    own = sorted([await on_alice.next_frame(), await on_alice.next_frame()], key=str)
    ack = {
        "type": "ack",
        "ref": "s1",
        "room": "plaza",
        "client_msg_id": "c-1",
        "id": message["id"],
        "seq": 1,
    }
    assert own == sorted([ack, message], key=str)

    await on_bob.send({"type": "ping", "ref": "p1"})
    pong, text = await next_raw(on_bob)
    assert pong == {"type": "pong", "ref": "p1"}
    # And on the wire, the exact text.
    assert text == '{"type":"pong","ref":"p1"}'
    await on_alice.nothing()
    await on_bob.nothing()


@pytest.mark.django_db(transaction=True)
async def test_binary_frames_arrive_exactly_with_the_fast_path_on_and_off(
    daphne, chat_client
):
    carol, key = await user_with_key("carol")
    client = await chat_client(daphne, key, name="carol", binary=True, record=True)
    assert client.subprotocol == protocol.SUBPROTOCOL_BINARY
    assert client.hello == hello(client.hello, carol)
    # On the wire: a 4-byte action code, then the frame's JSON without its type.
    first = as_it_came(client, client.hello)
    assert first[:4] == struct.pack(">I", protocol.FRAME_CODES["hello"])
    frame = {"type": "hello", **json.loads(first[4:])}
    assert frame == hello(frame, carol)
    pong = struct.pack(">I", protocol.FRAME_CODES["pong"]) + b'{"ref":"p1"}'
    await client.send({"type": "ping", "ref": "p1"})
    assert await next_raw(client) == ({"type": "pong", "ref": "p1"}, pong)
    # A ping in exactly these bytes gets exactly these bytes back.
    ping = struct.pack(">I", protocol.FRAME_CODES["ping"]) + b'{"ref":"p1"}'
    await client.send_raw(ping)
    assert await next_raw(client) == ({"type": "pong", "ref": "p1"}, pong)


@pytest.mark.django_db(transaction=True)
async def test_compress_gzip_sends_frames_over_1024_bytes_gzipped_in_both_framings(
    daphne, chat_client
):
    # Which frames come gzipped, and how, is on the wire: the two gzip sockets
    # record every frame as it came.
    dave, key = await user_with_key("dave")
    await room_create("annals")
    plain = await chat_client(daphne, key, name="plain")
    json_gzip = await chat_client(
        daphne, key, name="json_gzip", compress=True, record=True
    )
    bin_gzip = await chat_client(
        daphne, key, name="bin_gzip", binary=True, compress=True, record=True
    )
    assert bin_gzip.subprotocol == protocol.SUBPROTOCOL_BINARY
    await plain.send({"type": "join", "room": "annals", "ref": "j"})
    assert (await plain.next_frame())["type"] == "joined"
    # hello: short, a text frame
    assert isinstance(as_it_came(json_gzip, json_gzip.hello), str)
    await json_gzip.send({"type": "join", "room": "annals", "ref": "j"})
    frame, text = await next_raw(json_gzip)
    assert isinstance(text, str)
    assert frame["type"] == json.loads(text)["type"] == "joined"
    await bin_gzip.send_raw(
        struct.pack(">I", protocol.FRAME_CODES["join"]) + b'{"room":"annals"}'
    )
    assert (await bin_gzip.next_frame())["type"] == "joined"
    body = "the quick brown fox jumps over the lazy dog " * 2
    for n in range(12):
        await plain.send(
            {"type": "send", "room": "annals", "body": body, "client_msg_id": f"c{n}"}
        )
    # Each socket gets every message and the ack: 12 acks and 12 messages for
    # the sender, 12 messages for the others; small frames stay uncompressed.
    sent = [await plain.next_frame() for _ in range(24)]
    assert sorted(frame["type"] for frame in sent) == ["ack"] * 12 + ["message"] * 12
    for _ in range(12):
        frame, text = await next_raw(json_gzip)
        assert (frame["type"], type(text)) == ("message", str)
        frame, framed = await next_raw(bin_gzip)
        assert framed[:4] == struct.pack(">I", protocol.FRAME_CODES["message"])

    await plain.send({"type": "history", "room": "annals", "ref": "h"})
    page = await plain.next_frame()
    assert page["type"] == "history"
    await json_gzip.send({"type": "history", "room": "annals", "ref": "h"})
    frame, compressed = await next_raw(json_gzip)
    assert frame == page
    assert isinstance(compressed, bytes)  # a binary frame holding the gzip
    # The page the plain socket got, in the server's compact JSON: over 1024.
    text = gzip.decompress(compressed).decode()
    assert text == json.dumps(page, separators=(",", ":"), ensure_ascii=False)
    assert len(text.encode()) > 1024
    assert len(compressed) < len(text.encode()) / 4
    await bin_gzip.send_raw(
        struct.pack(">I", protocol.FRAME_CODES["history"])
        + b'{"room":"annals","ref":"h"}'
    )
    frame, framed = await next_raw(bin_gzip)
    assert frame == page
    code = protocol.FRAME_CODES["history"] | protocol.COMPRESSED_CODE_BIT
    assert framed[:4] == struct.pack(">I", code)
    assert {"type": "history", **json.loads(gzip.decompress(framed[4:]))} == page
    # Short frames stay as they were.
    await json_gzip.send({"type": "ping", "ref": "p"})
    assert await next_raw(json_gzip) == (
        {"type": "pong", "ref": "p"},
        '{"type":"pong","ref":"p"}',
    )


@pytest.mark.django_db(transaction=True)
async def test_an_idle_socket_still_works_after_its_handshake_is_released(
    daphnes, chat_client
):
    # release_handshake() runs at accept, and every later socket's compaction
    # moves more attributes to the protocol's class: the first socket lives on.
    server = daphnes["on"]
    _, idle_key = await user_with_key("idle")
    await room_create("quiet")
    idle = await chat_client(server, idle_key, name="idle")
    await idle.send({"type": "join", "room": "quiet", "ref": "j1"})
    assert (await idle.next_frame())["online"] == ["idle"]
    talkers = []
    for k in range(5):
        _, key = await user_with_key(f"talker{k}")
        talkers.append(await chat_client(server, key, name=f"talker{k}"))
    await talkers[-1].send({"type": "join", "room": "quiet", "ref": "j2"})
    assert (await talkers[-1].next_frame())["type"] == "joined"
    assert await idle.next_frame() == {
        "type": "presence",
        "room": "quiet",
        "user": "talker4",
        "status": "online",
    }

    await talkers[-1].send(
        {
            "type": "send",
            "room": "quiet",
            "body": "still there?",
            "client_msg_id": "t-1",
        }
    )
    received = await idle.next_frame()
    assert received == await stored_message("quiet", 1)
    await idle.send({"type": "ping", "ref": "p1"})
    assert await idle.next_frame() == {"type": "pong", "ref": "p1"}
    await idle.send(
        {"type": "send", "room": "quiet", "body": "yes", "client_msg_id": "i-1"}
    )
    frames = [await idle.next_frame(), await idle.next_frame()]
    assert sorted(frame["type"] for frame in frames) == ["ack", "message"]


@pytest.mark.django_db(transaction=True)
async def test_a_replaced_socket_closes_with_its_code_and_reason(daphne, chat_client):
    _, key = await user_with_key("dana")
    older = await chat_client(daphne, key, name="older", device="phone")
    await chat_client(daphne, key, name="newer", device="phone")
    assert await older.expect_close() == REPLACED


@pytest.mark.parametrize("fast_path", ["1", "0"])
@pytest.mark.django_db(transaction=True)
async def test_sigterm_closes_every_socket_with_1001_and_its_reason(
    fast_path, django_db_blocker, chat_client
):
    # Daphne 4.2 alone refuses 1001 and drops every reason: the close patch's job.
    server = daphne_start(django_db_blocker, CHAT_FAST_PATH=fast_path)
    try:
        _, key = await user_with_key("erin")
        sockets = [await chat_client(server, key, name=f"erin{n}") for n in range(2)]
        server.process.send_signal(signal.SIGTERM)
        for socket in sockets:
            assert await socket.expect_close() == (1001, "server shutting down")
    finally:
        server.stop()


@pytest.mark.django_db(transaction=True)
async def test_another_twisted_installed_serves_through_plain_asgi(
    tmp_path, django_db_blocker, chat_client
):
    # A distribution's metadata found first on the path is what is installed,
    # as far as importlib.metadata, and so the guard, can tell.
    path = shadow_distribution(tmp_path, "Twisted", "25.5.0")
    server = daphne_start(django_db_blocker, PYTHONPATH=str(path))
    try:
        lines = await log_lines(server)
        summary = "fast path off: twisted 25.5.0 installed, written for 26.10.0"
        assert summary in lines
        warnings = [line for line in lines if "Not the versions" in line]
        assert len(warnings) == 1, lines
        assert (
            "To fix, install the lock: pip install -r requirements.txt" in (warnings[0])
        )
        user, key = await user_with_key("fred")
        socket = await chat_client(
            server, key, name="tablet", device="tablet", record=True
        )
        assert socket.hello == hello(socket.hello, user)
        await socket.send({"type": "ping", "ref": "p1"})
        # Decoded, and on the wire the exact text.
        assert await next_raw(socket) == (
            {"type": "pong", "ref": "p1"},
            '{"type":"pong","ref":"p1"}',
        )
        # Twisted is none of the close patch's business: still applied.
        await chat_client(server, key, name="newer", device="tablet")
        assert await socket.expect_close() == REPLACED
    finally:
        server.stop()


@pytest.mark.django_db(transaction=True)
async def test_another_daphne_installed_is_not_patched_and_loses_close_reasons(
    tmp_path, django_db_blocker, chat_client
):
    # What the close patch is for, shown by daphne 4.2.3 without it.
    path = shadow_distribution(tmp_path, "daphne", "4.3.0")
    server = daphne_start(django_db_blocker, PYTHONPATH=str(path))
    try:
        lines = await log_lines(server)
        assert "fast path off: daphne 4.3.0 installed, written for 4.2.3" in lines
        warnings = [line for line in lines if "Not the versions" in line]
        assert len(warnings) == 1, lines
        assert "daphne's close is not patched" in warnings[0]
        _, key = await user_with_key("gina")
        older = await chat_client(server, key, name="older", device="phone")
        await chat_client(server, key, name="newer", device="phone")
        assert await older.expect_close() == (4409, "")
    finally:
        server.stop()


# --- close codes on both paths -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_frame_over_64_kib_closes_with_1009(daphne, chat_client):
    _, key = await user_with_key("big")
    socket = await chat_client(daphne, key, name="big")
    await socket.send_raw("x" * (64 * 1024 + 1))
    assert await socket.expect_close() == (1009, "")


@pytest.mark.django_db(transaction=True)
async def test_a_socket_past_the_per_user_limit_closes_with_1013(daphne, chat_client):
    from django.conf import settings

    limit = settings.CHAT_MAX_CONNECTIONS_PER_USER
    _, key = await user_with_key("crowd")
    for n in range(limit):
        await chat_client(daphne, key, name=f"crowd{n}")
    # Closed before its hello: the close frame is what it gets.
    with pytest.raises(ChatClosed) as closed:
        await chat_client(daphne, key, name="extra")
    assert (closed.value.code, closed.value.reason) == (
        1013,
        f"too many connections: at most {limit} per user",
    )


@pytest.fixture(scope="module")
def quick_daphnes(django_db_setup, django_db_blocker):
    """Daphne with a one-second heartbeat, fast path on and off."""
    servers = {}
    try:
        for path, flag in (("on", "1"), ("off", "0")):
            with django_db_blocker.unblock():
                server = DaphneServer(
                    heartbeat=1, extra_env={"CHAT_FAST_PATH": flag}, verbosity=0
                )
            servers[path] = server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.parametrize("path", ["on", "off"])
@pytest.mark.django_db(transaction=True)
async def test_a_silent_socket_closes_with_4408(quick_daphnes, chat_client, path):
    _, key = await user_with_key("quiet")
    socket = await chat_client(quick_daphnes[path], key, name="quiet", keepalive=False)
    assert socket.hello["heartbeat"] == 1
    # Silence for twice the heartbeat is what is under test: the close comes by
    # itself within the check interval (a third of a heartbeat) after that.
    assert await socket.expect_close(timeout=TIMEOUT) == (
        4408,
        "nothing received for 2 seconds",
    )


@pytest.mark.django_db(transaction=True)
async def test_a_flood_through_rate_limited_closes_with_1008(daphne, chat_client):
    from django.conf import settings

    from chat.throttle import STRIKES_BEFORE_CLOSE, parse_rate

    allowed = parse_rate(settings.CHAT_RATE_LIMIT).count
    _, key = await user_with_key("flood")
    await room_create("torrent")
    # No keep-alive ping: every frame sent is the test's.
    socket = await chat_client(daphne, key, name="flood", keepalive=False)
    for i in range(allowed + STRIKES_BEFORE_CLOSE):
        await socket.send({"type": "history", "room": "torrent", "ref": str(i)})
    replies = [await socket.next_frame() for _ in range(allowed + STRIKES_BEFORE_CLOSE)]
    assert [reply.get("code", reply["type"]) for reply in replies] == (
        ["history"] * allowed + ["rate_limited"] * STRIKES_BEFORE_CLOSE
    )
    assert await socket.expect_close() == (
        1008,
        "rate limit: 10 frames refused in a row",
    )


@pytest.fixture(scope="module")
def faulty_daphnes(django_db_setup, django_db_blocker):
    """Daphne serving tests.faults.asgi (a history of room boom raises)."""
    servers = {}
    try:
        for path, flag in (("on", "1"), ("off", "0")):
            with django_db_blocker.unblock():
                server = DaphneServer(
                    extra_env={"CHAT_FAST_PATH": flag},
                    verbosity=0,
                    application="tests.faults.asgi:application",
                )
            servers[path] = server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.parametrize("path", ["on", "off"])
@pytest.mark.django_db(transaction=True)
async def test_an_unexpected_server_error_closes_with_1011(
    faulty_daphnes, chat_client, path
):
    server = faulty_daphnes[path]
    _, key = await user_with_key("unlucky")
    await room_create("boom")
    socket = await chat_client(server, key, name="unlucky")
    await socket.send({"type": "history", "room": "boom", "ref": "h"})
    assert await socket.expect_close() == (1011, "server error")
    assert "RuntimeError: a fault put in by tests.faults" in server.output()
    # The process goes on serving others.
    other = await chat_client(server, key, name="other")
    assert other.hello["type"] == "hello"


@pytest.fixture(scope="module")
def redis_daphnes(django_db_setup, django_db_blocker):
    """A private Redis, and daphne on it with the fast path on and off."""
    redis_server = RedisServer().start()
    servers = {}
    try:
        for path, flag in (("on", "1"), ("off", "0")):
            with django_db_blocker.unblock():
                server = DaphneServer(
                    redis_url=redis_server.url,
                    extra_env={"CHAT_FAST_PATH": flag},
                    verbosity=0,
                )
            servers[path] = server.start()
        yield redis_server, servers
    finally:
        for server in servers.values():
            server.stop()
        redis_server.stop()


@pytest.mark.redis
@pytest.mark.parametrize("path", ["on", "off"])
@pytest.mark.django_db(transaction=True)
async def test_a_ban_and_a_deactivation_close_live_sockets_with_4403(
    redis_daphnes, chat_client, path
):
    from channels.db import database_sync_to_async

    from chat import services

    redis_server, servers = redis_daphnes
    server = servers[path]
    banned, banned_key = await user_with_key(f"banned-{path}")
    gone, gone_key = await user_with_key(f"gone-{path}")
    on_banned = await chat_client(server, banned_key, name="banned")
    on_gone = await chat_client(server, gone_key, name="gone")
    with this_process_uses_redis(redis_server.url):
        await database_sync_to_async(services.user_ban)(user=banned, reason="spam")
        assert await on_banned.expect_close() == (4403, "banned: spam")
        await database_sync_to_async(services.user_deactivate)(user=gone)
        assert await on_gone.expect_close() == (4403, "account deactivated")


# --- empty messages ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "sent"),
    [
        ({"text": ""}, [(b"", False)]),
        ({"bytes": b""}, [(b"", True)]),
        ({"text": "", "bytes": None}, [(b"", False)]),
        ({"text": None, "bytes": b""}, [(b"", True)]),
        ({"text": "hi"}, [(b"hi", False)]),
        ({"text": "", "bytes": b"\x00"}, [(b"\x00", True)]),
    ],
)
def test_daphne_sends_an_empty_message_as_an_empty_frame(message, sent):
    from daphne.ws_protocol import WebSocketProtocol

    serving.configure()  # chatsite.asgi, which conftest imports, did
    wire = WebSocketProtocol.__new__(WebSocketProtocol)
    wire.state = wire.STATE_OPEN
    wire.client_addr = ["127.0.0.1", 1]
    frames = []
    wire.sendMessage = lambda payload, isBinary=False: frames.append(
        (payload, isBinary)
    )
    wire.handle_reply({"type": "websocket.send", **message})
    assert frames == sent


@pytest.fixture(scope="module")
def echo_servers():
    """The conformance suite's echo endpoint, fast path on and off."""
    from tests.conformance.server import EchoServer

    servers = {}
    try:
        servers["on"] = EchoServer(fast_path=True).start()
        servers["off"] = EchoServer(fast_path=False).start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.parametrize("path", ["on", "off"])
async def test_an_empty_message_goes_out_as_an_empty_frame_on_both_paths(
    echo_servers, path
):
    server = echo_servers[path]
    async with connect(server.ws_url, close_timeout=2) as websocket:
        for message in ["", b"", "after", b"", ""]:
            await websocket.send(message)
            echoed = await asyncio.wait_for(websocket.recv(), TIMEOUT)
            assert (type(echoed), echoed) == (type(message), message)
    assert server.alive(), f"daphne died:\n{server.output()}"
