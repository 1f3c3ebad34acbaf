"""One socket per device key (``chat.consumers``), through the real ASGI application.

``tests/test_moderation_multiprocess.py`` replaces across server processes.
"""

import pytest
from asgiref.sync import sync_to_async

pytestmark = pytest.mark.django_db(transaction=True)


async def closed_with(client, timeout=3):
    output = await client.communicator.receive_output(timeout=timeout)
    client.connected = False
    return output


async def test_same_device_key_replaces_the_older_connection(connect, bob, token_for):
    key = await sync_to_async(token_for)(bob)
    old = await connect(path=f"/ws/?token={key}&device=phone")
    laptop = await connect(path=f"/ws/?token={key}&device=laptop")

    new = await connect(path=f"/ws/?token={key}&device=phone")

    assert await closed_with(old) == {
        "type": "websocket.close",
        "code": 4409,
        "reason": "replaced by a newer connection with the same device key",
    }
    assert await new.request(type="ping") == {"type": "pong"}
    assert await laptop.request(type="ping") == {"type": "pong"}
