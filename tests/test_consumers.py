"""The WebSocket API through the real ASGI application, frame by frame.

``tests/test_application.py`` has the handshake that comes before the ``hello``.
"""

import json
import struct

import pytest
from asgiref.sync import sync_to_async

from chat import services
from chat.models import Membership, Message, Room

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async


async def send_message(client, body, msg_id, room="lobby"):
    """Send and return the ack, skipping the sender's own ``message`` echo."""
    await client.send(type="send", room=room, body=body, client_msg_id=msg_id)
    frames = [await client.recv(), await client.recv()]
    return next(f for f in frames if f["type"] == "ack")


# --- hello -------------------------------------------------------------


async def test_hello_is_the_first_frame_with_user_and_heartbeat(connect, alice):
    client = await connect(alice)
    hello = client.hello
    assert set(hello) == {"type", "protocol", "connection_id", "user", "heartbeat"}
    assert hello["type"] == "hello"
    assert hello["protocol"] == 1
    assert hello["user"] == {"id": alice.pk, "username": "alice"}
    assert hello["heartbeat"] == 30
    assert isinstance(hello["connection_id"], str) and hello["connection_id"]


async def test_connection_ids_differ_per_socket(connect, alice):
    first = await connect(alice)
    second = await connect(alice)
    assert first.hello["connection_id"] != second.hello["connection_id"]


# --- join / leave ----------------------------------------------------------


async def test_join_replies_joined_with_room_state(connect, alice, lobby):
    client = await connect(alice)
    joined = await client.join("lobby", ref="j1")
    assert joined == {
        "type": "joined",
        "room": "lobby",
        "title": "The Lobby",
        "last_seq": 0,
        "online": ["alice"],
        "read_seq": 0,
        "private": False,
        "direct": False,
        "closed": False,
        "ref": "j1",
    }


async def test_join_unknown_room_is_not_found(connect, alice):
    client = await connect(alice)
    reply = await client.join("nowhere", ref="r")
    assert reply == {
        "type": "error",
        "code": "not_found",
        "message": "no room 'nowhere'",
        "ref": "r",
    }


async def test_join_private_room_as_non_member_is_forbidden(connect, alice, bob):
    await adb(services.room_create)(
        slug="staff", title="Staff", is_private=True, creator=bob
    )
    client = await connect(alice)
    reply = await client.join("staff")
    assert reply["type"] == "error"
    assert reply["code"] == "forbidden"


async def test_join_private_room_as_member_works(connect, alice, bob):
    await adb(services.room_create)(
        slug="staff", title="Staff", is_private=True, creator=bob
    )
    client = await connect(bob)
    reply = await client.join("staff")
    assert reply["type"] == "joined"
    assert reply["private"] is True


async def test_join_public_room_makes_a_membership(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    roles = await adb(list)(
        Membership.objects.filter(user=alice).values_list("role", flat=True)
    )
    assert roles == ["member"]


async def test_join_since_recovers_missed_messages_in_order(connect, alice, bob, lobby):
    sender = await connect(alice)
    await sender.join("lobby")
    for n in range(1, 6):
        await send_message(sender, f"m{n}", f"c{n}")
    client = await connect(bob)
    joined = await client.join("lobby", since=2)
    assert joined["last_seq"] == 5
    recovered = [await client.recv() for _ in range(3)]
    assert [(f["type"], f["seq"], f["body"]) for f in recovered] == [
        ("message", 3, "m3"),
        ("message", 4, "m4"),
        ("message", 5, "m5"),
    ]
    assert await client.recv() == {
        "type": "recovered",
        "room": "lobby",
        "complete": True,
    }


async def test_join_since_over_1000_missed_sends_newest_and_incomplete(
    connect, alice, lobby
):
    def store_many():
        Message.objects.bulk_create(
            Message(
                room=lobby, seq=n, author=alice, body=f"b{n}", client_msg_id=f"x{n}"
            )
            for n in range(1, 1203)
        )
        Room.objects.filter(pk=lobby.pk).update(last_seq=1202)

    await adb(store_many)()
    client = await connect(alice)
    await client.join("lobby", since=1)
    frames = [await client.recv() for _ in range(1001)]
    seqs = [f["seq"] for f in frames[:1000]]
    assert seqs == list(range(203, 1203))
    assert frames[1000] == {"type": "recovered", "room": "lobby", "complete": False}


async def test_leave_replies_left_and_stops_delivery(connect, alice, bob, lobby):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    assert (await a.recv())["type"] == "presence"
    assert await b.request(type="leave", room="lobby", ref="l") == {
        "type": "left",
        "room": "lobby",
        "ref": "l",
    }
    assert await a.recv() == {
        "type": "presence",
        "room": "lobby",
        "user": "bob",
        "status": "offline",
    }
    await send_message(a, "after", "c1")
    assert await b.nothing() is True


async def test_leave_of_a_room_not_joined_is_not_joined(connect, alice, lobby):
    client = await connect(alice)
    reply = await client.request(type="leave", room="lobby")
    assert reply["code"] == "not_joined"


# --- presence --------------------------------------------------------------


async def test_presence_online_once_per_user_and_offline_after_last_socket(
    connect, alice, bob, lobby
):
    a = await connect(alice)
    await a.join("lobby")
    b1 = await connect(bob)
    await b1.join("lobby")
    assert await a.recv() == {
        "type": "presence",
        "room": "lobby",
        "user": "bob",
        "status": "online",
    }
    b2 = await connect(bob)
    joined = await b2.join("lobby")
    assert joined["online"] == ["alice", "bob"]
    assert await a.nothing() is True
    await b1.close()
    assert await a.nothing() is True
    await b2.close()
    assert await a.recv() == {
        "type": "presence",
        "room": "lobby",
        "user": "bob",
        "status": "offline",
    }


# --- send ------------------------------------------------------------------


async def test_send_acks_the_sender_and_delivers_to_the_room(
    connect, alice, bob, lobby
):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    await a.recv()  # presence of bob
    await a.send(type="send", room="lobby", body="hello", client_msg_id="c-1", ref="s1")
    frames = {f["type"]: f for f in [await a.recv(), await a.recv()]}
    message = await b.recv()
    stored = await adb(Message.objects.get)(client_msg_id="c-1")
    assert frames["ack"] == {
        "type": "ack",
        "ref": "s1",
        "room": "lobby",
        "client_msg_id": "c-1",
        "id": stored.pk,
        "seq": 1,
    }
    assert message == {
        "type": "message",
        "room": "lobby",
        "id": stored.pk,
        "seq": 1,
        "user": {"id": alice.pk, "username": "alice"},
        "body": "hello",
        "created_at": stored.created_at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "client_msg_id": "c-1",
        "edited_at": None,
        "deleted": False,
    }
    assert frames["message"] == message


async def test_seq_increases_by_one_per_message(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    acks = [await send_message(client, f"m{n}", f"c{n}") for n in range(5)]
    assert [ack["seq"] for ack in acks] == [1, 2, 3, 4, 5]


async def test_retry_with_same_client_msg_id_stores_one_message(
    connect, alice, bob, lobby
):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    await a.recv()
    first = await send_message(a, "once", "dup")
    assert (await b.recv())["seq"] == 1
    await a.send(type="send", room="lobby", body="once", client_msg_id="dup")
    second = await a.recv()
    assert second == first
    assert await b.nothing() is True
    assert await adb(Message.objects.count)() == 1


async def test_send_to_a_room_not_joined_is_not_joined(connect, alice, lobby):
    client = await connect(alice)
    reply = await client.request(
        type="send", room="lobby", body="x", client_msg_id="c", ref="q"
    )
    assert reply == {
        "type": "error",
        "code": "not_joined",
        "message": "join room 'lobby' first",
        "ref": "q",
    }


async def test_body_over_4000_characters_is_too_large(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    reply = await client.request(
        type="send", room="lobby", body="x" * 4001, client_msg_id="c", ref="big"
    )
    assert reply["code"] == "too_large"
    assert reply["ref"] == "big"
    ack = await send_message(client, "x" * 4000, "c2")
    assert ack["seq"] == 1


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "send", "room": "lobby", "body": "", "client_msg_id": "c"},
        {"type": "send", "room": "lobby", "body": "x"},
        {"type": "send", "room": "lobby", "body": 5, "client_msg_id": "c"},
        {"type": "send", "room": "lobby", "body": "x", "client_msg_id": "c" * 65},
        {"type": "send", "room": "bad slug!", "body": "x", "client_msg_id": "c"},
        {"type": "history", "room": "lobby", "limit": 0},
        {"type": "history", "room": "lobby", "limit": 101},
        {"type": "join", "room": "lobby", "since": -1},
        {"type": "join", "room": "lobby", "since": "3"},
        {"type": "edit", "room": "lobby", "id": True, "body": "x"},
        {"type": "read", "room": "lobby"},
        {"type": "dm", "body": "x", "client_msg_id": "c"},
        {"type": "fly"},
        {"room": "lobby"},
    ],
)
async def test_ill_formed_frames_are_bad_request_and_the_socket_stays_usable(
    connect, alice, lobby, frame
):
    client = await connect(alice)
    await client.join("lobby")
    reply = await client.request(**frame, ref="bad")
    assert reply["type"] == "error"
    assert reply["code"] == "bad_request"
    assert reply["ref"] == "bad"
    assert await client.request(type="ping", ref="p") == {"type": "pong", "ref": "p"}


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '"text"', "{"])
async def test_non_object_frames_are_bad_request(connect, alice, text):
    client = await connect(alice)
    await client.communicator.send_to(text_data=text)
    reply = await client.recv()
    assert reply["type"] == "error"
    assert reply["code"] == "bad_request"
    assert "ref" not in reply


async def test_ref_longer_than_64_characters_is_bad_request(connect, alice):
    client = await connect(alice)
    reply = await client.request(type="ping", ref="r" * 65)
    assert reply["code"] == "bad_request"


async def test_frame_over_64_kib_closes_with_1009(connect, alice):
    client = await connect(alice)
    await client.communicator.send_to(
        text_data=json.dumps({"type": "ping", "x": "y" * 70000})
    )
    closed = await client.communicator.receive_output(timeout=2)
    assert closed == {"type": "websocket.close", "code": 1009}
    client.connected = False


async def test_send_to_closed_room_is_room_closed(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    await adb(Room.objects.filter(pk=lobby.pk).update)(is_closed=True)
    reply = await client.request(type="send", room="lobby", body="x", client_msg_id="c")
    assert reply["code"] == "room_closed"
    assert await adb(Message.objects.count)() == 0


# --- history ---------------------------------------------------------------


async def test_history_pages_back_in_ascending_order(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    for n in range(1, 8):
        await send_message(client, f"m{n}", f"c{n}")
    page = await client.request(type="history", room="lobby", limit=3, ref="h")
    assert [m["seq"] for m in page["messages"]] == [5, 6, 7]
    assert page["has_more"] is True
    assert page["ref"] == "h"
    assert "type" not in page["messages"][0]
    older = await client.request(type="history", room="lobby", before=5, limit=3)
    assert [m["seq"] for m in older["messages"]] == [2, 3, 4]
    assert older["has_more"] is True
    oldest = await client.request(type="history", room="lobby", before=2, limit=3)
    assert [m["body"] for m in oldest["messages"]] == ["m1"]
    assert oldest["has_more"] is False


async def test_history_default_limit_is_50(connect, alice, lobby):
    def store_many():
        Message.objects.bulk_create(
            Message(room=lobby, seq=n, author=alice, body="b", client_msg_id=f"x{n}")
            for n in range(1, 61)
        )

    await adb(store_many)()
    client = await connect(alice)
    page = await client.request(type="history", room="lobby")
    assert [m["seq"] for m in page["messages"]] == list(range(11, 61))
    assert page["has_more"] is True


async def test_history_needs_read_access_not_a_join(connect, alice, bob, lobby):
    await adb(services.room_create)(
        slug="staff", title="Staff", is_private=True, creator=bob
    )
    client = await connect(alice)
    public = await client.request(type="history", room="lobby")
    assert public == {
        "type": "history",
        "room": "lobby",
        "messages": [],
        "has_more": False,
    }
    private = await client.request(type="history", room="staff")
    assert private["code"] == "forbidden"
    missing = await client.request(type="history", room="nowhere")
    assert missing["code"] == "not_found"


# --- typing ----------------------------------------------------------------


async def test_typing_reaches_the_others_not_the_typist(connect, alice, bob, lobby):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    await a.recv()
    await a.send(type="typing", room="lobby")
    assert await b.recv() == {"type": "typing", "room": "lobby", "user": "alice"}
    assert await a.nothing() is True


async def test_typing_in_a_room_not_joined_is_not_joined(connect, alice, lobby):
    client = await connect(alice)
    assert (await client.request(type="typing", room="lobby"))["code"] == "not_joined"


# --- edit / delete ---------------------------------------------------------


async def test_edit_own_message_acks_and_tells_the_room(connect, alice, bob, lobby):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    await a.recv()
    ack = await send_message(a, "tpyo", "c1")
    await b.recv()
    await a.send(type="edit", room="lobby", id=ack["id"], body="typo", ref="e")
    frames = {f["type"]: f for f in [await a.recv(), await a.recv()]}
    assert frames["ack"] == {
        "type": "ack",
        "ref": "e",
        "room": "lobby",
        "client_msg_id": "c1",
        "id": ack["id"],
        "seq": 1,
    }
    edited = await b.recv()
    stored = await adb(Message.objects.get)(pk=ack["id"])
    assert edited == {
        "type": "message_edited",
        "room": "lobby",
        "id": ack["id"],
        "seq": 1,
        "body": "typo",
        "edited_at": stored.edited_at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
    }
    assert stored.body == "typo"


async def test_edit_of_someone_elses_message_is_forbidden(connect, alice, bob, lobby):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    await a.recv()
    ack = await send_message(a, "mine", "c1")
    await b.recv()
    reply = await b.request(type="edit", room="lobby", id=ack["id"], body="yours")
    assert reply["code"] == "forbidden"
    assert (await adb(Message.objects.get)(pk=ack["id"])).body == "mine"


async def test_moderator_may_delete_anyones_message(connect, alice, bob, lobby):
    await adb(services.membership_add)(room=lobby, user=bob, role="moderator")
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    await a.recv()
    ack = await send_message(a, "spam", "c1")
    await b.recv()
    await b.send(type="delete", room="lobby", id=ack["id"], ref="d")
    frames = {f["type"]: f for f in [await b.recv(), await b.recv()]}
    assert frames["ack"]["id"] == ack["id"]
    assert frames["message_deleted"] == {
        "type": "message_deleted",
        "room": "lobby",
        "id": ack["id"],
        "seq": 1,
    }
    assert await a.recv() == frames["message_deleted"]


async def test_deleted_message_shows_in_history_without_body(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    ack = await send_message(client, "secret", "c1")
    await client.send(type="delete", room="lobby", id=ack["id"])
    await client.recv()
    await client.recv()
    page = await client.request(type="history", room="lobby")
    assert page["messages"][0]["body"] == ""
    assert page["messages"][0]["deleted"] is True
    again = await client.request(type="delete", room="lobby", id=ack["id"])
    assert again["code"] == "not_found"


async def test_edit_of_unknown_message_is_not_found(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    reply = await client.request(type="edit", room="lobby", id=999, body="x")
    assert reply["code"] == "not_found"


# --- read ------------------------------------------------------------------


async def test_read_stores_the_marker_without_reply(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    for n in range(3):
        await send_message(client, "m", f"c{n}")
    await client.send(type="read", room="lobby", seq=2)
    assert await client.nothing() is True
    await client.send(type="read", room="lobby", seq=1)  # never moves back
    await client.send(type="read", room="lobby", seq=99)  # never past the end
    await client.request(type="ping")
    membership = await adb(Membership.objects.get)(room=lobby, user=alice)
    assert membership.read_seq == 3
    rejoined = await (await connect(alice)).join("lobby")
    assert rejoined["read_seq"] == 3


async def test_read_in_a_room_not_joined_is_not_joined(connect, alice, lobby):
    client = await connect(alice)
    reply = await client.request(type="read", room="lobby", seq=1)
    assert reply["code"] == "not_joined"


# --- dm --------------------------------------------------------------------


async def test_dm_reaches_the_other_user_without_a_join(connect, alice, bob):
    a = await connect(alice)
    b = await connect(bob)
    room = f"dm-{min(alice.pk, bob.pk)}-{max(alice.pk, bob.pk)}"
    await a.send(type="dm", to="bob", body="psst", client_msg_id="d1", ref="x")
    frames = {f["type"]: f for f in [await a.recv(), await a.recv()]}
    assert frames["ack"]["room"] == room
    assert frames["ack"]["seq"] == 1
    assert frames["ack"]["ref"] == "x"
    message = await b.recv()
    assert message["type"] == "message"
    assert message["room"] == room
    assert message["body"] == "psst"
    assert message["user"] == {"id": alice.pk, "username": "alice"}
    joined = await b.join(room)
    assert joined["direct"] is True
    assert joined["title"] == "alice & bob"


async def test_dm_to_unknown_user_is_not_found(connect, alice):
    client = await connect(alice)
    reply = await client.request(type="dm", to="nobody", body="x", client_msg_id="c")
    assert reply["code"] == "not_found"


async def test_dm_room_is_private_to_its_two_users(connect, alice, bob, make_user):
    carol = await adb(make_user)("carol")
    a = await connect(alice)
    ack = await a.request(type="dm", to="bob", body="x", client_msg_id="c")
    if ack["type"] != "ack":
        ack = await a.recv()
    c = await connect(carol)
    assert (await c.join(ack["room"]))["code"] == "forbidden"


# --- ping ------------------------------------------------------------------


async def test_ping_gets_pong(connect, alice):
    client = await connect(alice)
    assert await client.request(type="ping") == {"type": "pong"}


# --- binary framing ----------------------------------------------------------


async def test_binary_subprotocol_frames_carry_a_4_byte_action_code(
    connect, alice, lobby
):
    _, key = await adb(services.api_token_create)(user=alice)
    client = await connect(path=f"/ws/?token={key}", subprotocols=["chat.v1.bin"])
    communicator = client.communicator
    hello = await communicator.receive_from()
    assert struct.unpack(">I", hello[:4]) == (1,)
    assert json.loads(hello[4:])["user"]["username"] == "alice"
    await communicator.send_to(bytes_data=struct.pack(">I", 2) + b'{"room":"lobby"}')
    joined = await communicator.receive_from()
    assert struct.unpack(">I", joined[:4]) == (3,)
    assert json.loads(joined[4:])["room"] == "lobby"
    await communicator.send_to(bytes_data=struct.pack(">I", 11) + b'{"ref":"p"}')
    pong = await communicator.receive_from()
    assert pong == struct.pack(">I", 12) + b'{"ref":"p"}'
