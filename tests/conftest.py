from collections import deque

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db import connections

from chat import fanout, policies, presence, registry, services, throttle
from chat.protocol import HISTORY_MAX_LIMIT
from chatsite.asgi import application


@pytest.fixture(autouse=True)
async def fresh_hub():
    """Each test gets a fresh fan-out hub and presence store, as a new process would."""
    from django.conf import settings

    layers, redis_url = settings.CHANNEL_LAYERS, settings.REDIS_URL
    yield
    # A leaked override (the settings fixture entered inside override_settings
    # restores the inner one) would point every later test at a dead Redis.
    assert (settings.CHANNEL_LAYERS, settings.REDIS_URL) == (layers, redis_url), (
        "the test left CHANNEL_LAYERS or REDIS_URL overridden"
    )
    await presence.stop_keeper()
    await services.presence_batches.stop()
    await policies.stop_idle_watch()
    await fanout.stop_hub()
    await presence.reset_store()
    await registry.reset_registry()
    await throttle.reset()
    await services.token_uses_reset()
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    # The database thread's connection would outlive the test database.
    await sync_to_async(connections.close_all)()


@pytest.fixture
def make_user(db):
    def make(username, password="pw-for-tests-123", **extra):
        return get_user_model().objects.create_user(
            username=username, password=password, **extra
        )

    return make


@pytest.fixture
async def alice(make_user):
    return await sync_to_async(make_user)("alice")


@pytest.fixture
async def bob(make_user):
    return await sync_to_async(make_user)("bob")


@pytest.fixture
async def lobby():
    return await sync_to_async(services.room_create)(slug="lobby", title="The Lobby")


@pytest.fixture
def token_for():
    def make(user):
        return services.api_token_create(user=user)[1]

    return make


class Client:
    """A WebSocket client over the real ASGI application.

    ``recv`` hands over every frame as it comes. ``follow`` and ``messages_until``
    are the opt-in way to read a room as the shipped clients do: a seq gap is
    filled with ``history``.
    """

    def __init__(self, communicator):
        self.communicator = communicator
        self.hello = None
        self.timelines = {}  # room -> {seq: message}, for the rooms followed
        self.highest = {}  # room -> highest seq received live
        self.gap_requests = []  # the history frames sent to fill gaps
        self._held = deque()  # frames read while waiting for a history reply

    async def send(self, **frame):
        await self.communicator.send_json_to(frame)

    async def recv(self, timeout=3):
        return await self.communicator.receive_json_from(timeout=timeout)

    async def request(self, **frame):
        await self.send(**frame)
        return await self.recv()

    async def join(self, room, **extra):
        return await self.request(type="join", room=room, **extra)

    def follow(self, joined):
        """Keep the messages of ``joined``'s room that come after its ``last_seq``."""
        self.timelines[joined["room"]] = {}
        self.highest[joined["room"]] = joined["last_seq"]

    async def messages_until(self, room, seq, timeout=3):
        """Read frames until the live messages of ``room`` reach ``seq``.

        Return the room's messages kept so far, in seq order, gaps filled; other
        frames are dropped.
        """
        while self.highest[room] < seq:
            frame = self._held.popleft() if self._held else await self.recv(timeout)
            if frame["type"] == "message" and frame["room"] in self.timelines:
                await self._take(frame)
        timeline = self.timelines[room]
        return [timeline[n] for n in sorted(timeline)]

    async def _take(self, frame):
        room, seq = frame["room"], frame["seq"]
        if seq > self.highest[room] + 1:
            await self._fill(room, low=self.highest[room], high=seq)
        self.timelines[room][seq] = {k: v for k, v in frame.items() if k != "type"}
        self.highest[room] = max(self.highest[room], seq)

    async def _fill(self, room, *, low, high):
        """Fetch the messages after seq ``low`` and before ``high`` with history.

        Page by page from ``high`` down. A page with fewer messages in the range
        than asked for holds all that remain (the others were removed): stop.
        """
        before = high
        while before > low + 1:
            limit = min(HISTORY_MAX_LIMIT, before - low - 1)
            ref = f"gap-{len(self.gap_requests) + 1}"
            request = {
                "type": "history",
                "room": room,
                "before": before,
                "limit": limit,
                "ref": ref,
            }
            self.gap_requests.append(request)
            await self.send(**request)
            page = await self._reply(ref)
            assert page["type"] == "history", page
            found = [m for m in page["messages"] if low < m["seq"] < before]
            for message in found:
                self.timelines[room].setdefault(message["seq"], message)
            if len(found) < limit:
                return
            before = found[0]["seq"]

    async def _reply(self, ref, timeout=3):
        """The frame answering ``ref``; the others wait in ``_held``."""
        while True:
            frame = await self.recv(timeout)
            if frame.get("ref") == ref:
                return frame
            self._held.append(frame)

    async def nothing(self, timeout=0.2):
        return await self.communicator.receive_nothing(timeout=timeout)

    async def close(self):
        await self.communicator.disconnect()


@pytest.fixture
async def connect(token_for):
    clients = []

    async def open_client(user=None, *, path=None, headers=None, subprotocols=None):
        if path is None:
            path = "/ws/"
            if user is not None:
                path = f"/ws/?token={await sync_to_async(token_for)(user)}"
        communicator = WebsocketCommunicator(
            application, path, headers=headers or [], subprotocols=subprotocols
        )
        connected, _ = await communicator.connect()
        client = Client(communicator)
        clients.append(client)
        if connected and subprotocols is None:
            client.hello = await client.recv()
        client.connected = connected
        return client

    yield open_client
    for client in clients:
        if client.connected:
            await client.close()


@pytest.fixture
async def chat_client():
    """``await chat_client(server, key, name=…, **ChatClient options)``: a
    connected ``ChatClient`` (``tests.clients.open_chat_client``), closed after
    the test."""
    from tests.clients import open_chat_client

    clients = []

    async def open_(server, key=None, **options):
        client = await open_chat_client(server, key, **options)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.close()


@pytest.fixture
def own_redis():
    """A redis-server of this test's own (it may stop and start it)."""
    from tests.servers import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def start_daphne(django_db_blocker):
    """``start_daphne(**DaphneServer options)`` → a started daphne, stopped after
    the test (its log printed, shown when the test fails)."""
    from tests.servers import DaphneServer

    started = []

    def start(**options):
        # database_url() reads the test database's connection settings.
        with django_db_blocker.unblock():
            server = DaphneServer(verbosity=0, **options)
        started.append(server.start())
        return server

    yield start
    for server in started:
        print(f"--- daphne log ---\n{server.output()}")
        server.stop()
