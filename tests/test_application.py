"""The ``/ws/`` handshake (``chat.application``) through the real ASGI application."""

import re
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.test import Client as HttpClient
from django.utils import timezone

from chat import fanout, presence, services

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async

# This process's id, then a counter (chat.consumers).
CONNECTION_ID = re.compile(rf"{re.escape(fanout.PROCESS_ID)}-[1-9][0-9]*")


async def session_cookie(user):
    http = HttpClient()
    await adb(http.force_login)(user)
    return f"sessionid={http.cookies['sessionid'].value}".encode()


async def assert_let_in(socket, user):
    """The socket is open, greeted as ``user``, and the one live connection."""
    assert socket.connected is True
    connection_id = socket.hello["connection_id"]
    assert CONNECTION_ID.fullmatch(connection_id), connection_id
    assert socket.hello == {
        "type": "hello",
        "protocol": 1,
        "connection_id": connection_id,
        "user": {"id": user.pk, "username": user.username},
        "heartbeat": 30,
    }
    live = await presence.live_connections()
    assert [(c["id"], c["user_id"]) for c in live] == [(connection_id, user.pk)]


# --- site ban ----------------------------------------------------------------------


async def test_site_ban_refuses_a_token_handshake(connect, alice, bob):
    await adb(services.user_ban)(user=bob, reason="spamming", actor=alice)

    refused = await connect(bob)

    assert refused.connected is False
    assert await presence.live_connections() == []


async def test_site_ban_refuses_a_session_cookie_handshake(connect, alice, bob):
    cookie = await session_cookie(bob)
    before = await connect(path="/ws/", headers=[(b"cookie", cookie)])
    await assert_let_in(before, bob)

    await adb(services.user_ban)(user=bob, reason="spamming", actor=alice)

    after = await connect(path="/ws/", headers=[(b"cookie", cookie)])
    assert after.connected is False


async def test_expired_site_ban_lets_the_user_in(connect, bob):
    past = timezone.now() - timedelta(minutes=1)
    await adb(services.user_ban)(user=bob, reason="old", expires_at=past)

    socket = await connect(bob)

    await assert_let_in(socket, bob)


async def test_lifted_site_ban_lets_the_user_in(connect, bob):
    ban = await adb(services.user_ban)(user=bob, reason="oops")
    await adb(services.ban_lift)(ban=ban)

    socket = await connect(bob)

    await assert_let_in(socket, bob)
