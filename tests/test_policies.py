"""A server process's policies (``chat.policies``): idle close, shutdown, GC.

The first test drives the ASGI application in this process; the others run a
real daphne process of the test's own, on a redis-server of the module's own,
and hold real WebSocket connections to it.
"""

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from tests.servers import ROOT, SECRET_KEY, DaphneServer, RedisServer
from tests.test_moderation_multiprocess import alive, join
from tests.test_multiprocess import room_create, user_with_key
from tests.waiting import until

pytestmark = pytest.mark.django_db(transaction=True)


# --- idle sockets ------------------------------------------------------------------


async def closed_with(client, timeout=3):
    output = await client.communicator.receive_output(timeout=timeout)
    client.connected = False
    return output


async def test_silent_connection_is_closed_with_4408(connect, bob, settings):
    settings.CHAT_HEARTBEAT = 1
    quiet = await connect(bob)
    assert quiet.hello["heartbeat"] == 1

    assert await closed_with(quiet, timeout=4) == {
        "type": "websocket.close",
        "code": 4408,
        "reason": "nothing received for 2 seconds",
    }


# --- a server process of the test's own --------------------------------------------


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def daphne(redis_server, transactional_db):
    """``daphne(heartbeat=…)``: a started daphne process, stopped after the test."""
    started = []

    def start(*, heartbeat):
        server = DaphneServer(
            redis_url=redis_server.url, heartbeat=heartbeat, verbosity=0
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        print(f"--- daphne {server.port} log ---\n{server.output()}")
        server.stop()


@pytest.mark.redis
async def test_a_silent_connection_is_closed_after_twice_the_heartbeat(
    daphne, chat_client
):
    server = daphne(heartbeat=1)
    _, key = await user_with_key("bob")
    silent = await chat_client(server, key, name="silent", keepalive=False)
    opened = time.monotonic()
    chatty = await chat_client(server, key, name="chatty", keepalive=0.5)
    assert silent.hello["heartbeat"] == chatty.hello["heartbeat"] == 1

    code_reason = await silent.expect_close(timeout=4)
    elapsed = time.monotonic() - opened
    assert code_reason == (4408, "nothing received for 2 seconds")
    assert 1.8 <= elapsed <= 2.6, f"closed after {elapsed:.2f}s"

    # What is tested here is an absence: the socket that pings outlives the
    # idle limit by more than an idle check. Only time shows it.
    await chatty.nothing(timeout=opened + 3.2 - time.monotonic())
    await alive(chatty)


# --- shutdown ----------------------------------------------------------------------


@pytest.mark.redis
async def test_sigterm_closes_every_socket_with_1001_before_the_process_exits(
    daphne, chat_client
):
    server = daphne(heartbeat=2)
    _, key = await user_with_key("bob")
    await room_create("hall")
    sockets = [await chat_client(server, key, name=f"bob#{n}") for n in (1, 2)]
    await join(sockets[0], "hall")
    process = server.process

    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)

    results = await asyncio.gather(*(s.expect_close(timeout=5) for s in sockets))
    assert results == [(1001, "server shutting down")] * 2
    exit_code = await until(
        process.poll,
        lambda code: code is not None,
        timeout=signalled + 5 - time.monotonic(),
        what="daphne's exit code 5s after SIGTERM",
    )
    assert exit_code == 0


# --- garbage collection ------------------------------------------------------------

GC_PROBE = """
import gc
import chatsite.asgi
from chat.consumers import ChatConsumer
fresh = type("Fresh", (), {})
tracked = {id(o) for o in gc.get_objects()}
print(gc.get_threshold(), id(ChatConsumer) in tracked, id(fresh) in tracked)
"""


def test_loading_the_application_freezes_it_out_of_gc_and_raises_the_thresholds():
    completed = subprocess.run(
        [sys.executable, "-c", GC_PROBE],
        cwd=ROOT,
        env={
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            "DJANGO_SECRET_KEY": SECRET_KEY,
            "DJANGO_DEBUG": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    # Classes loaded at start-up are frozen (no longer listed); new objects are.
    assert completed.stdout == "(50000, 20, 100) False True\n"
