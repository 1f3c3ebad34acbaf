"""Slow readers against real daphne: the send buffer bound and its 1008.

A client that stops reading while its room is busy must not make the server
hold its frames without bound, nor slow anyone else down: past
``CHAT_SEND_BUFFER_BYTES`` waiting (in the send buffer and in Twisted) its
socket is closed with 1008 and what waited is let go. Both paths: the fast path
(frames written straight to daphne's sockets) and plain ASGI.
"""

import asyncio
import json
import re
import socket as sockets
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chat import services
from chat.models import Room
from chat.protocol import RECOVERY_MAX_MESSAGES
from tests.servers import DaphneServer
from tests.test_multiprocess import room_create, user_with_key
from tests.waiting import until

pytestmark = pytest.mark.django_db(transaction=True)

BUFFER_BYTES = 256 * 1024
BODY = "x" * 3900
MESSAGES = 1500  # ~6 MB of frames: far past what the kernel and the bound hold
TIMEOUT = 30
WINDOW = 16  # sends in flight: 16 x ~8 KB stays well under the bound


@pytest.fixture(scope="module")
def servers(django_db_setup, django_db_blocker):
    """Daphne with the fast path on and off, a 256 KiB send buffer, no rate limit."""
    started = {}
    try:
        for path, flag in (("on", "1"), ("off", "0")):
            with django_db_blocker.unblock():
                server = DaphneServer(
                    verbosity=0,
                    extra_env={
                        "CHAT_FAST_PATH": flag,
                        "CHAT_RATE_LIMIT": "0",
                        "CHAT_SEND_BUFFER_BYTES": str(BUFFER_BYTES),
                    },
                )
            started[path] = server.start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def rss_kib(server):
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1])


async def open_ws(server, key, *, receive_buffer=None, max_queue=None):
    """A WebSocket to ``server``; with ``receive_buffer`` a small kernel buffer."""
    sock = None
    if receive_buffer is not None:
        sock = sockets.socket(sockets.AF_INET, sockets.SOCK_STREAM)
        sock.setsockopt(sockets.SOL_SOCKET, sockets.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    websocket = await connect(
        f"{server.ws_url}?token={key}",
        sock=sock,
        max_queue=max_queue,
        close_timeout=2,
    )
    assert json.loads(await websocket.recv())["type"] == "hello"
    return websocket


async def join(websocket, room):
    await websocket.send(json.dumps({"type": "join", "room": room, "ref": "j"}))
    while (frame := json.loads(await websocket.recv()))["type"] != "joined":
        pass
    return frame


@pytest.mark.parametrize("path", ["on", "off"])
async def test_a_client_that_stops_reading_is_closed_with_1008_and_others_go_on(
    servers, path
):
    server = servers[path]
    room = f"busy-{path}"
    await room_create(room)
    _, writer_key = await user_with_key(f"writer-{path}")
    _, reader_key = await user_with_key(f"reader-{path}")
    _, slow_key = await user_with_key(f"slow-{path}")

    writer = await open_ws(server, writer_key)
    reader = await open_ws(server, reader_key)
    # Reads one frame into its queue, then stops reading the socket at all.
    slow = await open_ws(server, slow_key, receive_buffer=4096, max_queue=1)
    await join(writer, room)
    await join(reader, room)
    await join(slow, room)
    rss_before = rss_kib(server)
    start = len(server.output())

    # The writer keeps at most WINDOW sends ahead of what both fast clients
    # have read back: on a loaded machine the test's own loop may lag, and
    # a fast client that fell 256 KiB behind would rightly be closed too.
    progress = {"acked": 0, "read": 0}
    moved = asyncio.Condition()

    async def advanced(key):
        async with moved:
            progress[key] += 1
            moved.notify_all()

    async def write_all():
        for i in range(MESSAGES):
            async with moved:
                await moved.wait_for(
                    lambda sent=i: sent - min(progress.values()) < WINDOW
                )
            await writer.send(
                json.dumps(
                    {
                        "type": "send",
                        "room": room,
                        "body": BODY,
                        "client_msg_id": str(i),
                    }
                )
            )

    async def read_all():
        seqs = []
        while len(seqs) < MESSAGES:
            frame = json.loads(await reader.recv())
            if frame["type"] == "message":
                seqs.append(frame["seq"])
                await advanced("read")
        return seqs

    async def drain_writer():
        while True:
            if json.loads(await writer.recv())["type"] == "ack":
                await advanced("acked")

    reading = asyncio.create_task(read_all())
    draining = asyncio.create_task(drain_writer())
    await write_all()
    seqs = await asyncio.wait_for(reading, TIMEOUT)
    # The reader got every message, in order, the slow one notwithstanding.
    assert seqs == list(range(1, MESSAGES + 1))

    closing = re.compile(r"closing \S+ with 1008: (\d+) bytes waiting")
    output = await until(
        server.output,
        closing.search,
        timeout=TIMEOUT,
        what="the server closing the slow reader",
    )
    # Closed as the next frame would pass the bound: never more waited.
    [waiting] = [int(n) for n in closing.findall(output[start:])]
    assert BUFFER_BYTES - len(BODY) - 200 < waiting <= BUFFER_BYTES
    # Now the slow client reads again: what the kernel held, then the close.
    received = 0
    try:
        while True:
            await asyncio.wait_for(slow.recv(), TIMEOUT)
            received += 1
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, f"no close frame: {closed!r}"
        assert (closed.rcvd.code, closed.rcvd.reason) == (
            1008,
            "too slow: more than CHAT_SEND_BUFFER_BYTES waiting to be read",
        )
    assert received < MESSAGES
    rss_after = rss_kib(server)
    print(
        f"slow client got {received} of {MESSAGES}; RSS {rss_before} -> {rss_after} KiB"
    )
    draining.cancel()
    for websocket in (writer, reader):
        await websocket.close()


@database_sync_to_async
def messages_store(slug, username, count):
    """``count`` messages of ``BODY`` by ``username`` in the room ``slug``."""
    room = Room.objects.get(slug=slug)
    author = get_user_model().objects.get(username=username)
    for start in range(0, count, 200):
        services.message_create_many(
            requests=[
                services.SendRequest(room, author, BODY, f"c{i}")
                for i in range(start, min(start + 200, count))
            ]
        )


@pytest.mark.parametrize("path", ["on", "off"])
async def test_a_recovery_bigger_than_the_send_buffer_goes_out_at_the_readers_pace(
    servers, path
):
    # 1000 missed messages (~4 MB) to a client with a small kernel buffer: the
    # server waits for it to read instead of holding them, and never closes it.
    server = servers[path]
    room = f"backlog-{path}"
    await room_create(room)
    _, key = await user_with_key(f"late-{path}")
    await messages_store(room, f"late-{path}", RECOVERY_MAX_MESSAGES)

    start = len(server.output())
    late = await open_ws(server, key, receive_buffer=4096)
    await late.send(json.dumps({"type": "join", "room": room, "since": 0}))
    frames = [json.loads(await asyncio.wait_for(late.recv(), TIMEOUT))]
    assert frames[0]["type"] == "joined"
    seqs = []
    while (frame := json.loads(await asyncio.wait_for(late.recv(), TIMEOUT)))[
        "type"
    ] == "message":
        seqs.append(frame["seq"])
        if len(seqs) % 100 == 0:
            await asyncio.sleep(0.05)  # a client busy elsewhere now and then
    assert seqs == list(range(1, RECOVERY_MAX_MESSAGES + 1))
    assert frame == {"type": "recovered", "room": room, "complete": True}
    assert "with 1008" not in server.output()[start:]
    await late.close()
