import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.db import connections

from chat import fanout, policies, presence, services, throttle
from chatsite.asgi import application


@pytest.fixture(autouse=True)
async def fresh_hub():
    """Each test gets a fresh fan-out hub and presence store, as a new process would."""
    yield
    await presence.stop_keeper()
    await policies.stop_idle_watch()
    await fanout.stop_hub()
    await presence.reset_store()
    await throttle.reset()
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
    """A WebSocket client over the real ASGI application."""

    def __init__(self, communicator):
        self.communicator = communicator
        self.hello = None

    async def send(self, **frame):
        await self.communicator.send_json_to(frame)

    async def recv(self, timeout=3):
        return await self.communicator.receive_json_from(timeout=timeout)

    async def request(self, **frame):
        await self.send(**frame)
        return await self.recv()

    async def join(self, room, **extra):
        return await self.request(type="join", room=room, **extra)

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
