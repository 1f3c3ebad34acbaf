"""Server push (``chat.push`` and ``POST /api/push``) to sockets on one process.

Sockets go through the real ASGI application. ``tests/test_moderation_multiprocess.py``
pushes across server processes, and through the ``chat_push`` command.
"""

import json
import re

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client as HttpClient

from chat import fanout, push, services

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async

# This process's id, then a counter (chat.consumers).
CONNECTION_ID = re.compile(rf"{re.escape(fanout.PROCESS_ID)}-[1-9][0-9]*")


def push_frame(event, data):
    return {"type": "push", "event": event, "data": data}


def connection_id_of(socket):
    connection_id = socket.hello["connection_id"]
    assert CONNECTION_ID.fullmatch(connection_id), connection_id
    return connection_id


# --- chat.push ---------------------------------------------------------------------


async def test_push_to_user_reaches_all_their_sockets_and_counts(connect, alice, bob):
    first = await connect(bob)
    second = await connect(bob)
    bystander = await connect(alice)

    reached = await push.to_user(bob, "invoice.paid", {"id": 7})

    assert reached == 2
    expected = push_frame("invoice.paid", {"id": 7})
    assert await first.recv() == expected
    assert await second.recv() == expected
    assert await bystander.nothing() is True


async def test_push_from_sync_code_returns_the_count(connect, bob):
    socket = await connect(bob)

    reached = await adb(push.to_user)(bob, "ping", None)

    assert reached == 1
    assert await socket.recv() == push_frame("ping", None)


async def test_push_to_room_reaches_joined_sockets_only(connect, alice, bob, lobby):
    joined = await connect(bob)
    await joined.join("lobby")
    elsewhere = await connect(alice)

    assert await push.to_room("lobby", "news", [1, 2]) == 1

    assert await joined.recv() == push_frame("news", [1, 2])
    assert await elsewhere.nothing() is True


async def test_push_to_connection_reaches_exactly_one(connect, bob):
    target = await connect(bob)
    other = await connect(bob)

    assert await push.to_connection(connection_id_of(target), "hi", {}) == 1

    assert await target.recv() == push_frame("hi", {})
    assert await other.nothing() is True
    assert await push.to_connection("nobody-1", "hi", {}) == 0


async def test_push_to_everyone(connect, alice, bob):
    sockets = [await connect(alice), await connect(bob)]

    assert await push.to_everyone("maintenance", {"in": 5}) == 2

    for socket in sockets:
        assert await socket.recv() == push_frame("maintenance", {"in": 5})


# --- POST /api/push ----------------------------------------------------------------


@pytest.fixture
async def pusher_key(make_user):
    def make():
        user = make_user("pusher")
        user.user_permissions.add(
            Permission.objects.get(
                codename="push_message", content_type__app_label="chat"
            )
        )
        return services.api_token_create(user=user)[1]

    return await adb(make)()


async def api_post(body, key=None, raw=None):
    http = HttpClient()
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    data = raw if raw is not None else json.dumps(body)
    response = await adb(http.post)(
        "/api/push", data=data, content_type="application/json", **headers
    )
    return response.status_code, response.json()


async def test_api_push_reaches_a_user_and_answers_202_with_the_count(
    connect, bob, pusher_key
):
    socket = await connect(bob)

    status, body = await api_post(
        {"event": "order.shipped", "data": {"n": 3}, "user": "bob"}, pusher_key
    )

    assert (status, body) == (202, {"connections": 1})
    assert await socket.recv() == push_frame("order.shipped", {"n": 3})


async def test_api_push_to_room_all_and_connection(connect, bob, lobby, pusher_key):
    socket = await connect(bob)
    await socket.join("lobby")
    connection_id = connection_id_of(socket)

    for data, target in (
        (1, {"room": "lobby"}),
        (2, {"all": True}),
        (3, {"connection_id": connection_id}),
    ):
        answer = await api_post({"event": "e", "data": data, **target}, pusher_key)
        assert answer == (202, {"connections": 1}), target
        assert await socket.recv() == push_frame("e", data), target


async def test_api_push_refuses_bad_credentials(make_user):
    body = {"event": "e", "data": 1, "all": True}
    unauthorized = (401, {"error": "send Authorization: Bearer <API token>"})
    assert await api_post(body) == unauthorized
    assert await api_post(body, "cs_nope") == unauthorized
    user = await adb(make_user)("plain")
    _, key = await adb(services.api_token_create)(user=user)
    assert await api_post(body, key) == (
        403,
        {"error": "this token's user lacks the chat.push_message permission"},
    )


ONE_TARGET = "name exactly one target: user, room, connection_id, all"


@pytest.mark.parametrize(
    ("body", "raw", "error"),
    [
        (None, "not json", "the body is not valid JSON"),
        ({"data": 1, "all": True}, None, "the body needs an 'event' string"),
        ({"event": "e", "all": True}, None, "the body needs 'data' (any JSON)"),
        ({"event": "e", "data": 1}, None, ONE_TARGET),
        ({"event": "e", "data": 1, "all": True, "room": "lobby"}, None, ONE_TARGET),
        ({"event": "e", "data": 1, "all": False}, None, "'all' must be true"),
        ({"event": "e", "data": 1, "room": "nowhere"}, None, "no room 'nowhere'"),
        ({"event": "e", "data": 1, "user": "ghost"}, None, "no user 'ghost'"),
        (
            {"event": "e", "data": 1, "user": "a\x00b"},
            None,
            "'user' must be a username",
        ),
        (
            {"event": "e", "data": 1, "room": "lob\ud800by"},
            None,
            "the body is not valid JSON",
        ),
        (
            {"event": "e", "data": 1, "room": "no such/slug"},
            None,
            "'room' must be a room slug (letters, digits, - and _)",
        ),
        (
            {"event": "e", "data": 1, "connection_id": "../x"},
            None,
            "'connection_id' must be a connection id as hello gives it",
        ),
        (
            None,
            '{"event":"e","all":true,"data":' + "[" * 5000 + "]" * 5000 + "}",
            "the body is not valid JSON",
        ),
    ],
)
async def test_api_push_answers_400_to_bad_bodies(pusher_key, body, raw, error):
    assert await api_post(body, pusher_key, raw=raw) == (400, {"error": error})
