"""Moderation effects, push and connection policies on one process."""

import json
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client as HttpClient
from django.utils import timezone

from chat import push, services
from chat.models import ModerationAction, Room

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async


async def closed_with(client, timeout=3):
    output = await client.communicator.receive_output(timeout=timeout)
    client.connected = False
    return output


# --- bans, mutes, room close -----------------------------------------------------


async def test_site_ban_closes_sockets_with_4403_and_refuses_handshakes(
    connect, alice, bob
):
    socket = await connect(bob)
    await adb(services.user_ban)(user=bob, reason="spamming", actor=alice)
    assert await closed_with(socket) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "banned: spamming",
    }
    again = await connect(bob)
    assert again.connected is False
    action = await adb(ModerationAction.objects.get)()
    assert (action.kind, action.actor_id, action.target_user_id, action.reason) == (
        "ban",
        alice.pk,
        bob.pk,
        "spamming",
    )


async def test_site_ban_refuses_a_session_cookie_handshake(connect, alice, bob):
    http = HttpClient()
    await adb(http.force_login)(bob)
    cookie = f"sessionid={http.cookies['sessionid'].value}".encode()
    before = await connect(path="/ws/", headers=[(b"cookie", cookie)])
    assert before.connected is True
    await adb(services.user_ban)(user=bob, reason="spamming", actor=alice)
    after = await connect(path="/ws/", headers=[(b"cookie", cookie)])
    assert after.connected is False


async def test_expired_site_ban_lets_the_user_in(connect, bob):
    past = timezone.now() - timedelta(minutes=1)
    await adb(services.user_ban)(user=bob, reason="old", expires_at=past)
    socket = await connect(bob)
    assert socket.connected is True


async def test_lifted_site_ban_lets_the_user_in(connect, bob):
    ban = await adb(services.user_ban)(user=bob, reason="oops")
    await adb(services.ban_lift)(ban=ban)
    assert (await connect(bob)).connected is True


async def test_room_ban_removes_the_user_from_that_room_only(connect, bob, lobby):
    await adb(services.room_create)(slug="other", title="Other")
    socket = await connect(bob)
    await socket.join("lobby")
    await socket.join("other")
    await adb(services.room_ban)(user=bob, room=lobby, reason="rude")
    assert await socket.recv() == {
        "type": "removed",
        "room": "lobby",
        "reason": "banned from the room: rude",
    }
    rejoin = await socket.join("lobby")
    assert rejoin["code"] == "forbidden"
    reply = await socket.request(type="send", room="lobby", body="x", client_msg_id="1")
    assert reply["code"] == "not_joined"
    history = await socket.request(type="history", room="lobby")
    assert history["code"] == "forbidden"
    await socket.send(type="send", room="other", body="still here", client_msg_id="2")
    frames = {f["type"] for f in [await socket.recv(), await socket.recv()]}
    assert frames == {"ack", "message"}


async def test_mute_refuses_sends_until_lifted(connect, bob, lobby):
    socket = await connect(bob)
    await socket.join("lobby")
    mute = await adb(services.user_mute)(user=bob, room=lobby, reason="calm down")
    reply = await socket.request(
        type="send", room="lobby", body="x", client_msg_id="1", ref="m"
    )
    assert reply == {
        "type": "error",
        "code": "muted",
        "message": "you are muted in 'lobby': calm down",
        "ref": "m",
    }
    await adb(services.mute_lift)(mute=mute)
    await socket.send(type="send", room="lobby", body="x", client_msg_id="1")
    assert {(await socket.recv())["type"], (await socket.recv())["type"]} == {
        "ack",
        "message",
    }


async def test_expired_mute_does_not_refuse(connect, bob, lobby):
    past = timezone.now() - timedelta(seconds=1)
    await adb(services.user_mute)(user=bob, room=lobby, reason="x", expires_at=past)
    socket = await connect(bob)
    await socket.join("lobby")
    await socket.send(type="send", room="lobby", body="x", client_msg_id="1")
    assert (await socket.recv())["type"] in {"ack", "message"}


async def test_closing_a_room_removes_sockets_and_refuses_sends(connect, alice, lobby):
    socket = await connect(alice)
    await socket.join("lobby")
    await socket.send(type="send", room="lobby", body="before", client_msg_id="1")
    await socket.recv()
    await socket.recv()
    await adb(services.room_close)(room=lobby, actor=alice)
    assert await socket.recv() == {
        "type": "removed",
        "room": "lobby",
        "reason": "room closed",
    }
    joined = await socket.join("lobby")
    assert joined["closed"] is True
    reply = await socket.request(type="send", room="lobby", body="x", client_msg_id="2")
    assert reply["code"] == "room_closed"
    history = await socket.request(type="history", room="lobby")
    assert [m["body"] for m in history["messages"]] == ["before"]
    await adb(services.room_reopen)(room=lobby)
    await socket.send(type="send", room="lobby", body="again", client_msg_id="3")
    assert {(await socket.recv())["type"], (await socket.recv())["type"]} == {
        "ack",
        "message",
    }


async def test_message_hide_tells_the_room(connect, alice, bob, lobby):
    socket = await connect(bob)
    await socket.join("lobby")
    message, _ = await adb(services.message_create)(
        room=lobby, author=bob, body="oops", client_msg_id="1"
    )
    await socket.recv()
    await adb(services.message_hide)(message=message, actor=alice, reason="spam")
    assert await socket.recv() == {
        "type": "message_deleted",
        "room": "lobby",
        "id": message.pk,
        "seq": 1,
    }


async def test_token_revoke_closes_only_sockets_opened_with_it(connect, bob):
    token, key = await adb(services.api_token_create)(user=bob)
    doomed = await connect(path=f"/ws/?token={key}")
    other = await connect(bob)
    await adb(services.api_token_revoke)(token=token)
    assert await closed_with(doomed) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "token revoked",
    }
    assert await other.request(type="ping") == {"type": "pong"}


async def test_sign_out_everywhere_closes_session_sockets_only(connect, bob):
    http = HttpClient()
    await adb(http.force_login)(bob)
    cookie = f"sessionid={http.cookies['sessionid'].value}".encode()
    browser = await connect(path="/ws/", headers=[(b"cookie", cookie)])
    script = await connect(bob)
    ended = await adb(services.user_sign_out_everywhere)(user=bob)
    assert ended == 1
    assert (await closed_with(browser))["code"] == 4403
    assert await script.request(type="ping") == {"type": "pong"}
    again = await connect(path="/ws/", headers=[(b"cookie", cookie)])
    assert again.connected is False


# --- device keys, idle ------------------------------------------------------------


async def test_same_device_key_replaces_the_older_connection(connect, bob, token_for):
    key = await adb(token_for)(bob)
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


async def test_silent_connection_is_closed_with_4408(connect, bob, settings):
    settings.CHAT_HEARTBEAT = 1
    quiet = await connect(bob)
    assert quiet.hello["heartbeat"] == 1
    assert await closed_with(quiet, timeout=4) == {
        "type": "websocket.close",
        "code": 4408,
        "reason": "nothing received for 2 seconds",
    }


# --- push -----------------------------------------------------------------------


async def test_push_to_user_reaches_all_their_sockets_and_counts(connect, alice, bob):
    first = await connect(bob)
    second = await connect(bob)
    bystander = await connect(alice)
    reached = await push.to_user(bob, "invoice.paid", {"id": 7})
    assert reached == 2
    expected = {"type": "push", "event": "invoice.paid", "data": {"id": 7}}
    assert await first.recv() == expected
    assert await second.recv() == expected
    assert await bystander.nothing() is True


async def test_push_from_sync_code_returns_the_count(connect, bob):
    socket = await connect(bob)
    reached = await adb(push.to_user)(bob, "ping", None)
    assert reached == 1
    assert await socket.recv() == {"type": "push", "event": "ping", "data": None}


async def test_push_to_room_reaches_joined_sockets_only(connect, alice, bob, lobby):
    joined = await connect(bob)
    await joined.join("lobby")
    elsewhere = await connect(alice)
    assert await push.to_room("lobby", "news", [1, 2]) == 1
    assert await joined.recv() == {"type": "push", "event": "news", "data": [1, 2]}
    assert await elsewhere.nothing() is True


async def test_push_to_connection_reaches_exactly_one(connect, bob):
    target = await connect(bob)
    other = await connect(bob)
    connection_id = target.hello["connection_id"]
    assert await push.to_connection(connection_id, "hi", {}) == 1
    assert await target.recv() == {"type": "push", "event": "hi", "data": {}}
    assert await other.nothing() is True
    assert await push.to_connection("nobody-1", "hi", {}) == 0


async def test_push_to_everyone(connect, alice, bob):
    sockets = [await connect(alice), await connect(bob)]
    assert await push.to_everyone("maintenance", {"in": 5}) == 2
    for socket in sockets:
        assert await socket.recv() == {
            "type": "push",
            "event": "maintenance",
            "data": {"in": 5},
        }


# --- HTTP push API ---------------------------------------------------------------


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
    assert await socket.recv() == {
        "type": "push",
        "event": "order.shipped",
        "data": {"n": 3},
    }


async def test_api_push_to_room_all_and_connection(connect, bob, lobby, pusher_key):
    socket = await connect(bob)
    await socket.join("lobby")
    assert await api_post({"event": "e", "data": 1, "room": "lobby"}, pusher_key) == (
        202,
        {"connections": 1},
    )
    assert (await socket.recv())["data"] == 1
    assert await api_post({"event": "e", "data": 2, "all": True}, pusher_key) == (
        202,
        {"connections": 1},
    )
    assert (await socket.recv())["data"] == 2
    target = {"connection_id": socket.hello["connection_id"]}
    assert await api_post({"event": "e", "data": 3, **target}, pusher_key) == (
        202,
        {"connections": 1},
    )
    assert (await socket.recv())["data"] == 3


async def test_api_push_refuses_bad_credentials(make_user):
    assert (await api_post({"event": "e", "data": 1, "all": True}))[0] == 401
    assert (await api_post({"event": "e", "data": 1, "all": True}, "cs_nope"))[0] == 401
    user = await adb(make_user)("plain")
    _, key = await adb(services.api_token_create)(user=user)
    assert (await api_post({"event": "e", "data": 1, "all": True}, key))[0] == 403


@pytest.mark.parametrize(
    ("body", "raw"),
    [
        (None, "not json"),
        ({"data": 1, "all": True}, None),
        ({"event": "e", "all": True}, None),
        ({"event": "e", "data": 1}, None),
        ({"event": "e", "data": 1, "all": True, "room": "lobby"}, None),
        ({"event": "e", "data": 1, "all": False}, None),
        ({"event": "e", "data": 1, "room": "nowhere"}, None),
        ({"event": "e", "data": 1, "user": "ghost"}, None),
    ],
)
async def test_api_push_answers_400_to_bad_bodies(pusher_key, body, raw):
    status, answer = await api_post(body, pusher_key, raw=raw)
    assert status == 400
    assert isinstance(answer["error"], str) and answer["error"]


async def test_room_close_is_recorded(alice, lobby):
    await adb(services.room_close)(room=lobby, actor=alice, reason="done")
    action = await adb(ModerationAction.objects.get)()
    assert (action.kind, action.room_id, action.reason) == (
        "room_close",
        lobby.pk,
        "done",
    )
    assert (await adb(Room.objects.get)(pk=lobby.pk)).is_closed is True


async def test_ban_recorded_after_the_fact_closes_nothing_until_made_current(
    connect, alice, bob
):
    socket = await connect(bob)
    past = timezone.now() - timedelta(minutes=5)
    ban = await adb(services.user_ban)(
        user=bob, reason="old news", expires_at=past, actor=alice
    )
    assert await socket.request(type="ping") == {"type": "pong"}
    ban.expires_at = None
    await adb(services.ban_update)(ban=ban, actor=alice)
    assert await closed_with(socket) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "banned: old news",
    }
    kinds = await adb(list)(
        ModerationAction.objects.order_by("created_at").values_list("detail", flat=True)
    )
    assert kinds[-1] == "changed: no end"
