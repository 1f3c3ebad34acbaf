"""The moderation services (``chat.services``) as live sockets on one process see them.

Sockets go through the real ASGI application; the services are called as the
admin calls them, and their after-commit effects reach the sockets through this
process's fan-out hub.
"""

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.test import Client as HttpClient
from django.utils import timezone

from chat import protocol, services
from chat.models import ModerationAction, Room
from tests.test_multiprocess import stored_message

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async


async def closed_with(client, timeout=3):
    output = await client.communicator.receive_output(timeout=timeout)
    client.connected = False
    return output


async def ack_and_message(socket, **send):
    """Send; return the sender's ack and its copy of the message, in that order."""
    await socket.send(type="send", **send)
    frames = [await socket.recv(), await socket.recv()]
    return sorted(frames, key=lambda frame: frame["type"])


def ack_of(stored, **ref):
    """The ack of the stored message ``stored`` (a ``message`` frame)."""
    return {
        "type": "ack",
        "room": stored["room"],
        "client_msg_id": stored["client_msg_id"],
        "id": stored["id"],
        "seq": stored["seq"],
        **ref,
    }


async def assert_stored_and_acked(socket, room, body, msg_id, seq):
    ack, message = await ack_and_message(
        socket, room=room, body=body, client_msg_id=msg_id
    )
    stored = await stored_message(room, seq)
    assert (stored["body"], stored["client_msg_id"]) == (body, msg_id)
    assert message == stored
    assert ack == ack_of(stored)


async def moderation_log():
    """(kind, actor id, target id, room id, reason, detail), oldest first."""
    rows = ModerationAction.objects.order_by("created_at", "pk").values_list(
        "kind", "actor_id", "target_user_id", "room_id", "reason", "detail"
    )
    return await adb(list)(rows)


async def session_cookie(user):
    http = HttpClient()
    await adb(http.force_login)(user)
    return f"sessionid={http.cookies['sessionid'].value}".encode()


# --- bans, mutes, room close -----------------------------------------------------


async def test_site_ban_closes_the_users_sockets_with_4403_and_records_it(
    connect, alice, bob
):
    socket = await connect(bob)

    await adb(services.user_ban)(user=bob, reason="spamming", actor=alice)

    assert await closed_with(socket) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "banned: spamming",
    }
    assert await moderation_log() == [
        ("ban", alice.pk, bob.pk, None, "spamming", "no end")
    ]


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
    banned = {
        "type": "error",
        "code": "forbidden",
        "message": "you are banned from 'lobby': rude",
    }
    assert await socket.join("lobby") == banned
    reply = await socket.request(type="send", room="lobby", body="x", client_msg_id="1")
    assert reply == {
        "type": "error",
        "code": "not_joined",
        "message": "join room 'lobby' first",
    }
    assert await socket.request(type="history", room="lobby") == banned
    await assert_stored_and_acked(socket, "other", "still here", "2", seq=1)


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

    await assert_stored_and_acked(socket, "lobby", "x", "1", seq=1)


async def test_expired_mute_does_not_refuse(connect, bob, lobby):
    past = timezone.now() - timedelta(seconds=1)
    await adb(services.user_mute)(user=bob, room=lobby, reason="x", expires_at=past)
    socket = await connect(bob)
    await socket.join("lobby")

    await assert_stored_and_acked(socket, "lobby", "x", "1", seq=1)


async def test_closing_a_room_removes_sockets_and_refuses_sends(connect, alice, lobby):
    socket = await connect(alice)
    await socket.join("lobby")
    await assert_stored_and_acked(socket, "lobby", "before", "1", seq=1)

    await adb(services.room_close)(room=lobby, actor=alice)

    assert await socket.recv() == {
        "type": "removed",
        "room": "lobby",
        "reason": "room closed",
    }
    assert await socket.join("lobby") == {
        "type": "joined",
        "room": "lobby",
        "title": "The Lobby",
        "last_seq": 1,
        "online": ["alice"],
        "read_seq": 0,
        "private": False,
        "direct": False,
        "closed": True,
    }
    reply = await socket.request(type="send", room="lobby", body="x", client_msg_id="2")
    assert reply == {
        "type": "error",
        "code": "room_closed",
        "message": "room 'lobby' is closed",
    }
    history = await socket.request(type="history", room="lobby")
    before = await stored_message("lobby", 1)
    del before["type"]  # history lists the message frames' payloads
    assert history == {
        "type": "history",
        "room": "lobby",
        "messages": [before],
        "has_more": False,
    }

    await adb(services.room_reopen)(room=lobby)

    await assert_stored_and_acked(socket, "lobby", "again", "3", seq=2)


async def test_room_close_is_recorded(alice, lobby):
    await adb(services.room_close)(room=lobby, actor=alice, reason="done")

    assert await moderation_log() == [
        ("room_close", alice.pk, None, lobby.pk, "done", "")
    ]
    assert (await adb(Room.objects.get)(pk=lobby.pk)).is_closed is True


async def test_message_hide_tells_the_room(connect, alice, bob, lobby):
    socket = await connect(bob)
    await socket.join("lobby")
    message, _ = await adb(services.message_create)(
        room=lobby, author=bob, body="oops", client_msg_id="1"
    )
    assert await socket.recv() == await stored_message("lobby", 1)

    await adb(services.message_hide)(message=message, actor=alice, reason="spam")

    assert await socket.recv() == {
        "type": "message_deleted",
        "room": "lobby",
        "id": message.pk,
        "seq": 1,
    }


# --- tokens and sessions -----------------------------------------------------------


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
    cookie = await session_cookie(bob)
    browser = await connect(path="/ws/", headers=[(b"cookie", cookie)])
    script = await connect(bob)

    ended = await adb(services.user_sign_out_everywhere)(user=bob)

    assert ended == 1
    assert await closed_with(browser) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "signed out",
    }
    assert await script.request(type="ping") == {"type": "pong"}
    again = await connect(path="/ws/", headers=[(b"cookie", cookie)])
    assert again.connected is False


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
    until = f"until {protocol.timestamp(past)}"
    assert await moderation_log() == [
        ("ban", alice.pk, bob.pk, None, "old news", until),
        ("ban", alice.pk, bob.pk, None, "old news", "changed: no end"),
    ]
