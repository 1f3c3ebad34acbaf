"""The WebSocket API through the real ASGI application, frame by frame.

``tests/test_application.py`` has the handshake that comes before the ``hello``.
"""

import asyncio
import json
import struct

import pytest
from asgiref.sync import sync_to_async

from chat import fanout, protocol, registry, services
from chat.models import Membership, Message, Room
from tests.test_application import CONNECTION_ID
from tests.test_multiprocess import stored_message
from tests.waiting import until

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async


def presence_frame(user, status, room="lobby"):
    return {"type": "presence", "room": room, "user": user, "status": status}


def error_frame(code, message, **ref):
    return {"type": "error", "code": code, "message": message, **ref}


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


def payload_of(stored):
    """A ``message`` frame as ``history`` lists it: without its ``type``."""
    return {key: value for key, value in stored.items() if key != "type"}


async def send_message(client, body, msg_id, room="lobby"):
    """Send; check the sender's ack and its own copy of the message; return the ack."""
    await client.send(type="send", room=room, body=body, client_msg_id=msg_id)
    frames = [await client.recv(), await client.recv()]
    ack, echo = sorted(frames, key=lambda frame: frame["type"])
    stored = await stored_message(room, ack["seq"])
    assert (stored["user"], stored["body"], stored["client_msg_id"]) == (
        client.hello["user"],
        body,
        msg_id,
    )
    assert echo == stored
    assert ack == ack_of(stored)
    return ack


async def closed_with(client, timeout=3):
    output = await client.communicator.receive_output(timeout=timeout)
    client.connected = False
    return output


# --- hello -------------------------------------------------------------


async def test_hello_is_the_first_frame_with_user_and_heartbeat(connect, alice):
    client = await connect(alice)

    connection_id = client.hello["connection_id"]
    assert CONNECTION_ID.fullmatch(connection_id), connection_id
    assert client.hello == {
        "type": "hello",
        "protocol": 1,
        "connection_id": connection_id,
        "user": {"id": alice.pk, "username": "alice"},
        "heartbeat": 30,
    }


async def test_each_socket_gets_the_next_connection_id_of_its_process(connect, alice):
    first = await connect(alice)
    second = await connect(alice)

    process_id, n = first.hello["connection_id"].rsplit("-", 1)
    assert process_id == fanout.PROCESS_ID
    assert second.hello["connection_id"] == f"{fanout.PROCESS_ID}-{int(n) + 1}"


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
        "online_count": 1,
        "read_seq": 0,
        "unread": 0,
        "mentions": 0,
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
    assert reply == error_frame("forbidden", "room 'staff' is private")


async def test_join_private_room_as_member_works(connect, alice, bob):
    await adb(services.room_create)(
        slug="staff", title="Staff", is_private=True, creator=bob
    )
    client = await connect(bob)
    reply = await client.join("staff")
    assert reply == {
        "type": "joined",
        "room": "staff",
        "title": "Staff",
        "last_seq": 0,
        "online": ["bob"],
        "online_count": 1,
        "read_seq": 0,
        "unread": 0,
        "mentions": 0,
        "private": True,
        "direct": False,
        "closed": False,
    }


async def test_a_room_joined_before_on_this_process_is_read_once_per_join(
    connect, alice, bob, lobby, monkeypatch
):
    from chat import selectors

    reads = []
    for name in ("room_access_get", "room_get"):
        original = getattr(selectors, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(selectors, name, counted)
    first, second = await connect(alice), await connect(bob)

    # The first join here listens, then reads the room again for last_seq.
    await first.join("lobby")
    assert reads == ["room_access_get", "room_get"]
    reads.clear()
    # The next knows the room's group: it listens before its one read.
    joined = await second.join("lobby")
    assert reads == ["room_access_get"]
    assert (joined["last_seq"], joined["online"]) == (0, ["alice", "bob"])
    await first.send(type="send", room="lobby", body="hi", client_msg_id="m1")
    assert (await second.recv())["body"] == "hi"


async def test_an_outsider_refused_a_room_known_here_gets_nothing_of_it(
    connect, alice, bob
):
    staff = await adb(services.room_create)(
        slug="staff", title="Staff", is_private=True, creator=bob
    )
    member = await connect(bob)
    await member.join("staff")
    outsider = await connect(alice)

    assert await outsider.join("staff") == error_frame(
        "forbidden", "room 'staff' is private"
    )
    await member.send(type="send", room="staff", body="secret", client_msg_id="s")
    assert (await member.recv())["type"] in {"ack", "message"}
    assert await outsider.nothing(0.3)
    hub = await fanout.get_hub()
    assert hub.holding == {}
    assert [c.username for c in hub.members[f"room.{staff.pk}"]] == ["bob"]


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
    assert joined == {
        "type": "joined",
        "room": "lobby",
        "title": "The Lobby",
        "last_seq": 5,
        "online": ["alice", "bob"],
        "online_count": 2,
        "read_seq": 5,
        "unread": 0,
        "mentions": 0,
        "private": False,
        "direct": False,
        "closed": False,
    }
    recovered = [await client.recv() for _ in range(3)]
    assert [(f["seq"], f["body"]) for f in recovered] == [
        (3, "m3"),
        (4, "m4"),
        (5, "m5"),
    ]
    assert recovered == [await stored_message("lobby", seq) for seq in (3, 4, 5)]
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
    recovered = [(f["type"], f["seq"], f["body"]) for f in frames[:1000]]
    assert recovered == [("message", n, f"b{n}") for n in range(203, 1203)]
    assert frames[1000] == {"type": "recovered", "room": "lobby", "complete": False}


async def test_leave_replies_left_and_stops_delivery(connect, alice, bob, lobby):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    assert await a.recv() == presence_frame("bob", "online")
    assert await b.request(type="leave", room="lobby", ref="l") == {
        "type": "left",
        "room": "lobby",
        "ref": "l",
    }
    assert await a.recv() == presence_frame("bob", "offline")
    await send_message(a, "after", "c1")
    assert await b.nothing() is True


async def test_leave_of_a_room_not_joined_is_not_joined(connect, alice, lobby):
    client = await connect(alice)
    reply = await client.request(type="leave", room="lobby", ref="l")
    assert reply == error_frame("not_joined", "join room 'lobby' first", ref="l")


# --- presence --------------------------------------------------------------


async def test_presence_online_once_per_user_and_offline_after_last_socket(
    connect, alice, bob, lobby
):
    a = await connect(alice)
    await a.join("lobby")
    b1 = await connect(bob)
    await b1.join("lobby")
    assert await a.recv() == presence_frame("bob", "online")
    b2 = await connect(bob)
    joined = await b2.join("lobby")
    assert joined == {
        "type": "joined",
        "room": "lobby",
        "title": "The Lobby",
        "last_seq": 0,
        "online": ["alice", "bob"],
        "online_count": 2,
        "read_seq": 0,
        "unread": 0,
        "mentions": 0,
        "private": False,
        "direct": False,
        "closed": False,
    }
    assert await a.nothing() is True
    await b1.close()
    assert await a.nothing() is True
    await b2.close()
    assert await a.recv() == presence_frame("bob", "offline")


# --- send ------------------------------------------------------------------


async def test_send_acks_the_sender_and_delivers_to_the_room(
    connect, alice, bob, lobby
):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    assert await a.recv() == presence_frame("bob", "online")
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
        "mentions": [],
        "reactions": [],
        "reply_to": None,
        "reply_count": 0,
        "attachments": [],
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
    assert await a.recv() == presence_frame("bob", "online")
    first = await send_message(a, "once", "dup")
    assert await b.recv() == await stored_message("lobby", 1)
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
    assert reply == error_frame(
        "too_large", "body is longer than 4000 characters", ref="big"
    )
    ack = await send_message(client, "x" * 4000, "c2")
    assert ack["seq"] == 1


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (
            {"type": "send", "room": "lobby", "body": "", "client_msg_id": "c"},
            "send: Expected `str` of length >= 1 - at `$.body`",
        ),
        (
            {"type": "send", "room": "lobby", "body": "x"},
            "send: Object missing required field `client_msg_id`",
        ),
        (
            {"type": "send", "room": "lobby", "body": 5, "client_msg_id": "c"},
            "send: Expected `str`, got `int` - at `$.body`",
        ),
        (
            {"type": "send", "room": "lobby", "body": "x", "client_msg_id": "c" * 65},
            "send: Expected `str` of length <= 64 - at `$.client_msg_id`",
        ),
        (
            {"type": "send", "room": "bad slug!", "body": "x", "client_msg_id": "c"},
            "send: Expected `str` matching regex '^[-a-zA-Z0-9_]{1,64}$' - at `$.room`",
        ),
        (
            {"type": "history", "room": "lobby", "limit": 0},
            "history: Expected `int` >= 1 - at `$.limit`",
        ),
        (
            {"type": "history", "room": "lobby", "limit": 101},
            "history: Expected `int` <= 100 - at `$.limit`",
        ),
        (
            {"type": "join", "room": "lobby", "since": -1},
            "join: Expected `int` >= 0 - at `$.since`",
        ),
        (
            {"type": "join", "room": "lobby", "since": "3"},
            "join: Expected `int | null`, got `str` - at `$.since`",
        ),
        (
            {"type": "edit", "room": "lobby", "id": True, "body": "x"},
            "edit: Expected `int`, got `bool` - at `$.id`",
        ),
        (
            {"type": "read", "room": "lobby"},
            "read: Object missing required field `seq`",
        ),
        (
            {"type": "dm", "body": "x", "client_msg_id": "c"},
            "dm: Object missing required field `to`",
        ),
        ({"type": "fly"}, "unknown frame type 'fly'"),
        ({"room": "lobby"}, "frame needs a type"),
    ],
)
async def test_ill_formed_frames_are_bad_request_and_the_socket_stays_usable(
    connect, alice, lobby, frame, message
):
    client = await connect(alice)
    await client.join("lobby")
    reply = await client.request(**frame, ref="bad")
    assert reply == error_frame("bad_request", message, ref="bad")
    assert await client.request(type="ping", ref="p") == {"type": "pong", "ref": "p"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "frame is not valid JSON"),
        ("[1, 2]", "frame must be a JSON object"),
        ('"text"', "frame must be a JSON object"),
        ("{", "frame is not valid JSON"),
    ],
)
async def test_non_object_frames_are_bad_request(connect, alice, text, message):
    client = await connect(alice)
    await client.communicator.send_to(text_data=text)
    reply = await client.recv()
    assert reply == error_frame("bad_request", message)


async def test_ref_longer_than_64_characters_is_bad_request(connect, alice):
    client = await connect(alice)
    reply = await client.request(type="ping", ref="r" * 65)
    assert reply == error_frame("bad_request", "ref must be a string of at most 64")


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
    assert reply == error_frame("room_closed", "room 'lobby' is closed")
    assert await adb(Message.objects.count)() == 0


# --- history ---------------------------------------------------------------


async def test_history_pages_back_in_ascending_order(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    for n in range(1, 8):
        await send_message(client, f"m{n}", f"c{n}")
    stored = [payload_of(await stored_message("lobby", seq)) for seq in range(1, 8)]
    page = await client.request(type="history", room="lobby", limit=3, ref="h")
    assert [m["seq"] for m in page["messages"]] == [5, 6, 7]
    assert page == {
        "type": "history",
        "room": "lobby",
        "messages": stored[4:7],
        "has_more": True,
        "ref": "h",
    }
    older = await client.request(type="history", room="lobby", before=5, limit=3)
    assert older == {
        "type": "history",
        "room": "lobby",
        "messages": stored[1:4],
        "has_more": True,
    }
    oldest = await client.request(type="history", room="lobby", before=2, limit=3)
    assert [m["body"] for m in oldest["messages"]] == ["m1"]
    assert oldest == {
        "type": "history",
        "room": "lobby",
        "messages": stored[0:1],
        "has_more": False,
    }


async def test_history_default_limit_is_50(connect, alice, lobby):
    def store_many():
        Message.objects.bulk_create(
            Message(room=lobby, seq=n, author=alice, body="b", client_msg_id=f"x{n}")
            for n in range(1, 61)
        )

    await adb(store_many)()
    client = await connect(alice)
    page = await client.request(type="history", room="lobby")
    assert [(m["seq"], m["body"]) for m in page.pop("messages")] == [
        (n, "b") for n in range(11, 61)
    ]
    assert page == {"type": "history", "room": "lobby", "has_more": True}


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
    assert private == error_frame("forbidden", "room 'staff' is private")
    missing = await client.request(type="history", room="nowhere")
    assert missing == error_frame("not_found", "no room 'nowhere'")


# --- typing ----------------------------------------------------------------


async def test_typing_reaches_the_others_not_the_typist(connect, alice, bob, lobby):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    assert await a.recv() == presence_frame("bob", "online")
    await a.send(type="typing", room="lobby")
    assert await b.recv() == {"type": "typing", "room": "lobby", "user": "alice"}
    assert await a.nothing() is True


async def test_typing_in_a_room_not_joined_is_not_joined(connect, alice, lobby):
    client = await connect(alice)
    reply = await client.request(type="typing", room="lobby")
    assert reply == error_frame("not_joined", "join room 'lobby' first")


# --- edit / delete ---------------------------------------------------------


async def test_edit_own_message_acks_and_tells_the_room(connect, alice, bob, lobby):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    assert await a.recv() == presence_frame("bob", "online")
    ack = await send_message(a, "tpyo", "c1")
    assert await b.recv() == await stored_message("lobby", 1)
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
        "mentions": [],
    }
    assert stored.body == "typo"


async def test_edit_of_someone_elses_message_is_forbidden(connect, alice, bob, lobby):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    assert await a.recv() == presence_frame("bob", "online")
    ack = await send_message(a, "mine", "c1")
    assert await b.recv() == await stored_message("lobby", 1)
    reply = await b.request(type="edit", room="lobby", id=ack["id"], body="yours")
    assert reply == error_frame(
        "forbidden", "only the author or a moderator may change it"
    )
    assert (await adb(Message.objects.get)(pk=ack["id"])).body == "mine"


async def test_moderator_may_delete_anyones_message(connect, alice, bob, lobby):
    await adb(services.membership_add)(room=lobby, user=bob, role="moderator")
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    assert await a.recv() == presence_frame("bob", "online")
    ack = await send_message(a, "spam", "c1")
    assert await b.recv() == await stored_message("lobby", 1)
    await b.send(type="delete", room="lobby", id=ack["id"], ref="d")
    frames = {f["type"]: f for f in [await b.recv(), await b.recv()]}
    assert frames["ack"] == {**ack, "ref": "d"}
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
    frames = sorted([await client.recv(), await client.recv()], key=lambda f: f["type"])
    deleted = {"type": "message_deleted", "room": "lobby", "id": ack["id"], "seq": 1}
    assert frames == [ack, deleted]
    page = await client.request(type="history", room="lobby")
    stored = await stored_message("lobby", 1)
    assert (stored["body"], stored["deleted"]) == ("", True)
    assert page == {
        "type": "history",
        "room": "lobby",
        "messages": [payload_of(stored)],
        "has_more": False,
    }
    again = await client.request(type="delete", room="lobby", id=ack["id"])
    gone = f"no message {ack['id']} in room 'lobby'"
    assert again == error_frame("not_found", gone)


async def test_edit_of_unknown_message_is_not_found(connect, alice, lobby):
    client = await connect(alice)
    await client.join("lobby")
    reply = await client.request(type="edit", room="lobby", id=999, body="x")
    assert reply == error_frame("not_found", "no message 999 in room 'lobby'")


# --- read ------------------------------------------------------------------


def read_marker(seq, unread=0, mentions=0, room="lobby"):
    return {
        "type": "read_marker",
        "room": room,
        "seq": seq,
        "unread": unread,
        "mentions": mentions,
    }


async def test_read_stores_the_marker_and_tells_every_socket_of_the_user(
    connect, alice, lobby
):
    client = await connect(alice)
    other_tab = await connect(alice)
    await client.join("lobby")
    for n in range(3):
        await send_message(client, "m", f"c{n}")
    await client.send(type="read", room="lobby", seq=2)
    # Her own messages are never unread to her.
    assert await client.recv() == read_marker(2)
    assert await other_tab.recv() == read_marker(2)
    await client.send(type="read", room="lobby", seq=1)  # never moves back
    assert await client.recv() == read_marker(2)
    await client.send(type="read", room="lobby", seq=99)  # never past the end
    assert await client.recv() == read_marker(3)
    assert await client.request(type="ping") == {"type": "pong"}
    membership = await adb(Membership.objects.get)(room=lobby, user=alice)
    assert membership.read_seq == 3
    rejoined = await (await connect(alice)).join("lobby")
    assert rejoined == {
        "type": "joined",
        "room": "lobby",
        "title": "The Lobby",
        "last_seq": 3,
        "online": ["alice"],
        "online_count": 1,
        "read_seq": 3,
        "unread": 0,
        "mentions": 0,
        "private": False,
        "direct": False,
        "closed": False,
    }


async def test_read_in_a_room_not_joined_is_not_joined(connect, alice, lobby):
    client = await connect(alice)
    reply = await client.request(type="read", room="lobby", seq=1)
    assert reply == error_frame("not_joined", "join room 'lobby' first")


# --- dm --------------------------------------------------------------------


async def test_dm_reaches_the_other_user_without_a_join(connect, alice, bob):
    a = await connect(alice)
    b = await connect(bob)
    room = f"dm-{min(alice.pk, bob.pk)}-{max(alice.pk, bob.pk)}"
    await a.send(type="dm", to="bob", body="psst", client_msg_id="d1", ref="x")
    frames = {f["type"]: f for f in [await a.recv(), await a.recv()]}
    stored = await stored_message(room, 1)
    assert (stored["user"], stored["body"], stored["client_msg_id"]) == (
        {"id": alice.pk, "username": "alice"},
        "psst",
        "d1",
    )
    assert frames == {"ack": ack_of(stored, ref="x"), "message": stored}
    assert await b.recv() == stored
    assert await b.join(room) == {
        "type": "joined",
        "room": room,
        "title": "alice & bob",
        "last_seq": 1,
        "online": ["bob"],
        "online_count": 1,
        "read_seq": 0,
        "unread": 1,
        "mentions": 0,
        "private": True,
        "direct": True,
        "closed": False,
    }


async def test_dm_to_unknown_user_is_not_found(connect, alice):
    client = await connect(alice)
    reply = await client.request(type="dm", to="nobody", body="x", client_msg_id="c")
    assert reply == error_frame("not_found", "no user 'nobody'")


async def test_dm_room_is_private_to_its_two_users(connect, alice, bob, make_user):
    carol = await adb(make_user)("carol")
    room = f"dm-{min(alice.pk, bob.pk)}-{max(alice.pk, bob.pk)}"
    a = await connect(alice)
    await a.send(type="dm", to="bob", body="x", client_msg_id="c")
    frames = sorted([await a.recv(), await a.recv()], key=lambda f: f["type"])
    stored = await stored_message(room, 1)
    assert frames == [ack_of(stored), stored]
    c = await connect(carol)
    assert await c.join(room) == error_frame("forbidden", f"room {room!r} is private")


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
    hello = json.loads(hello[4:])
    assert CONNECTION_ID.fullmatch(hello["connection_id"]), hello
    assert hello == {
        "protocol": 1,
        "connection_id": hello["connection_id"],
        "user": {"id": alice.pk, "username": "alice"},
        "heartbeat": 30,
    }
    await communicator.send_to(bytes_data=struct.pack(">I", 2) + b'{"room":"lobby"}')
    joined = await communicator.receive_from()
    assert struct.unpack(">I", joined[:4]) == (3,)
    assert json.loads(joined[4:]) == {
        "room": "lobby",
        "title": "The Lobby",
        "last_seq": 0,
        "online": ["alice"],
        "online_count": 1,
        "read_seq": 0,
        "unread": 0,
        "mentions": 0,
        "private": False,
        "direct": False,
        "closed": False,
    }
    await communicator.send_to(bytes_data=struct.pack(">I", 11) + b'{"ref":"p"}')
    pong = await communicator.receive_from()
    assert pong == struct.pack(">I", 12) + b'{"ref":"p"}'


# --- device keys -------------------------------------------------------------------
# One socket per device key; tests/test_moderation_multiprocess.py replaces across
# server processes.


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


# --- presence in big rooms ------------------------------------------------------


async def test_past_50_online_a_room_gets_one_presence_batch_a_second(
    connect, make_user, lobby
):
    from chat import services

    users = [await adb(make_user)(f"u{n:02}") for n in range(55)]
    watcher = await connect(users[0])
    await watcher.join("lobby")
    clients = [watcher]
    for user in users[1:]:
        client = await connect(user)
        joined = await client.join("lobby")
        clients.append(client)
    assert (joined["online_count"], len(joined["online"])) == (55, 55)
    # Up to 50 online, each arrival is a frame of its own...
    presence_of = {"type": "presence", "room": "lobby", "status": "online"}
    assert [await watcher.recv() for _ in range(49)] == [
        {**presence_of, "user": f"u{n:02}"} for n in range(1, 50)
    ]
    # ...past it, the room's changes come together, a second later at most.
    batch = await watcher.recv(timeout=services.PRESENCE_BATCH_SECONDS + 2)
    assert batch == {
        "type": "presence_batch",
        "room": "lobby",
        "online": [f"u{n:02}" for n in range(50, 55)],
        "offline": [],
        "online_count": 55,
    }
    assert await watcher.nothing(timeout=0.5)
    # Every member gets the same batch, the newcomers too.
    assert await clients[54].recv(timeout=3) == batch
    await clients[54].close()
    clients[54].connected = False
    await clients[53].request(type="leave", room="lobby")
    assert await watcher.recv(timeout=services.PRESENCE_BATCH_SECONDS + 2) == {
        "type": "presence_batch",
        "room": "lobby",
        "online": [],
        "offline": ["u53", "u54"],
        "online_count": 53,
    }


async def test_joined_lists_100_of_the_users_online_and_counts_them_all(
    connect, make_user, lobby
):
    users = [await adb(make_user)(f"u{n:03}") for n in range(102)]
    for user in users[:101]:
        await (await connect(user)).join("lobby")
    joined = await (await connect(users[101])).join("lobby")
    assert joined["online"] == [f"u{n:03}" for n in range(100)]
    assert joined["online_count"] == 102


# --- however a socket ends -----------------------------------------------------


async def test_sockets_that_end_every_way_leave_nothing_behind(
    connect, alice, bob, lobby
):
    from chat import presence

    async def joined_client(user):
        client = await connect(user)
        await client.join("lobby")
        return client

    watcher = await joined_client(bob)
    polite = await joined_client(alice)
    too_big = await joined_client(alice)
    cancelled = await joined_client(alice)
    kicked = await joined_client(alice)
    assert await registry.live_count() == 5

    await polite.close()  # a normal close from the client
    polite.connected = False
    await too_big.communicator.send_to(text_data="x" * (70 * 1024))
    assert await closed_with(too_big) == {"type": "websocket.close", "code": 1009}
    await too_big.communicator.disconnect()
    cancelled.communicator.future.cancel()  # the server gave up on the task
    cancelled.connected = False
    await adb(services.connection_disconnect)(
        connection_id=kicked.hello["connection_id"], reason="test"
    )
    assert await closed_with(kicked) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "kicked by a moderator: test",
    }
    await kicked.communicator.disconnect()

    await until(registry.live_count, lambda n: n == 1, timeout=3, what="live")
    online = await until(
        lambda: presence.room_online(lobby),
        lambda o: o == (["bob"], 1),
        timeout=3,
        what="online",
    )
    assert online == (["bob"], 1)
    hub = await fanout.get_hub()
    assert [c.connection_id for c in hub.connections] == [
        watcher.hello["connection_id"]
    ]
    assert hub.local_members(fanout.user_group(alice.pk)) == ()
    presence_of = {"type": "presence", "room": "lobby", "user": "alice"}
    assert [await watcher.recv(), await watcher.recv()] == [
        {**presence_of, "status": "online"},
        {**presence_of, "status": "offline"},
    ]
    assert await watcher.nothing()


async def test_a_handler_raising_even_while_answering_an_error_leaves_no_ghost(
    connect, alice, bob, lobby, monkeypatch
):
    # The ghosts of issue 9: a socket whose handler raised (here a bug in the
    # history selector, and a failure while building an error frame) must
    # still leave presence, the registry, the hub and the push counts.
    from chat import presence, selectors

    watcher = await connect(bob)
    await watcher.join("lobby")
    crashing, erroring = await connect(alice), await connect(alice)
    for client in (crashing, erroring):
        await client.join("lobby")
    assert await watcher.recv() == {
        "type": "presence",
        "room": "lobby",
        "user": "alice",
        "status": "online",
    }

    def history_bug(**options):
        raise RuntimeError("a bug in a selector")

    monkeypatch.setattr(selectors, "message_history", history_bug)
    await crashing.send(type="history", room="lobby")
    assert await closed_with(crashing) == {
        "type": "websocket.close",
        "code": 1011,
        "reason": "server error",
    }

    def error_bug(error, *, ref):
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(protocol, "error_from", error_bug)
    await erroring.send(type="leave", room="nope")
    for client in (crashing, erroring):
        with pytest.raises((RuntimeError, UnicodeEncodeError)):
            await client.communicator.wait(timeout=3)
        client.connected = False

    assert (
        await until(registry.live_count, lambda n: n == 1, timeout=3, what="live") == 1
    )
    assert await presence.room_online(lobby) == (["bob"], 1)
    hub = await fanout.get_hub()
    assert [c.connection_id for c in hub.connections] == [
        watcher.hello["connection_id"]
    ]
    assert hub.local_members(fanout.user_group(alice.pk)) == ()
    assert await services.push_to_user(user_id=alice.pk, event="e", data={}) == 0
    assert await watcher.recv() == {
        "type": "presence",
        "room": "lobby",
        "user": "alice",
        "status": "offline",
    }
    assert await watcher.nothing()


async def test_a_send_to_a_room_deleted_since_the_join_is_not_found(
    connect, alice, lobby
):
    client = await connect(alice)
    await client.join("lobby")
    await adb(Room.objects.filter(pk=lobby.pk).delete)()
    reply = await client.request(
        type="send", room="lobby", body="x", client_msg_id="c", ref="gone"
    )
    assert reply == {
        "type": "error",
        "code": "not_found",
        "message": "no room 'lobby'",
        "ref": "gone",
    }
    assert await client.request(type="ping", ref="p") == {"type": "pong", "ref": "p"}


# --- connections per user --------------------------------------------------------


async def open_raw(path):
    """A socket over the real application, before any frame is read."""
    from channels.testing import WebsocketCommunicator

    from chatsite.asgi import application

    communicator = WebsocketCommunicator(application, path)
    connected, _ = await communicator.connect()
    return communicator, connected


async def test_a_socket_past_the_per_user_limit_is_closed_with_1013(
    connect, alice, bob, token_for, settings
):

    settings.CHAT_MAX_CONNECTIONS_PER_USER = 2
    key = await adb(token_for)(alice)
    first = await connect(path=f"/ws/?token={key}")
    await connect(path=f"/ws/?token={key}")
    extra, accepted = await open_raw(f"/ws/?token={key}")
    assert accepted is True
    assert await extra.receive_output(timeout=3) == {
        "type": "websocket.close",
        "code": 1013,
        "reason": "too many connections: at most 2 per user",
    }
    await extra.disconnect()
    assert await registry.live_count(user_id=alice.pk) == 2
    other_user = await connect(bob)
    assert other_user.hello["user"] == {"id": bob.pk, "username": "bob"}

    await first.close()
    first.connected = False
    again = await connect(path=f"/ws/?token={key}")
    assert again.hello["user"] == {"id": alice.pk, "username": "alice"}
    assert await registry.live_count(user_id=alice.pk) == 2


async def test_sockets_opened_at_once_never_pass_the_per_user_limit(
    alice, token_for, settings
):

    settings.CHAT_MAX_CONNECTIONS_PER_USER = 2
    key = await adb(token_for)(alice)
    opened = await asyncio.gather(*(open_raw(f"/ws/?token={key}") for _ in range(8)))
    answers = [await socket.receive_output(timeout=3) for socket, _ in opened]
    refusal = {
        "type": "websocket.close",
        "code": 1013,
        "reason": "too many connections: at most 2 per user",
    }
    served = [a for a in answers if a != refusal]
    assert all(a["type"] == "websocket.send" for a in served), answers
    assert len(served) <= 2
    assert await registry.live_count(user_id=alice.pk) == len(served)
    for socket, _ in opened:
        await socket.disconnect()
    assert await registry.live_count(user_id=alice.pk) == 0


async def test_a_device_that_replaces_its_socket_is_let_in_at_the_limit(
    connect, alice, token_for, settings
):
    settings.CHAT_MAX_CONNECTIONS_PER_USER = 2
    key = await adb(token_for)(alice)
    phone = await connect(path=f"/ws/?token={key}&device=phone")
    await connect(path=f"/ws/?token={key}")
    new_phone = await connect(path=f"/ws/?token={key}&device=phone")
    assert new_phone.hello["user"] == {"id": alice.pk, "username": "alice"}
    assert await closed_with(phone) == {
        "type": "websocket.close",
        "code": 4409,
        "reason": "replaced by a newer connection with the same device key",
    }


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"text_data": '{"type":"ping"}'}, "chat.v1.bin takes binary frames only"),
        ({"bytes_data": b"\x00\x00"}, "binary frame is shorter than its 4-byte code"),
        ({"bytes_data": struct.pack(">I", 99) + b"{}"}, "unknown action code 99"),
        (
            {"bytes_data": struct.pack(">I", 2) + b'{"room":"\xff\xfe"}'},
            "binary frame payload is not valid JSON",
        ),
        (
            {
                "bytes_data": struct.pack(">I", 11)
                + b'{"x":'
                + b"[" * 30_000
                + b"]" * 30_000
                + b"}"
            },
            "binary frame payload is not valid JSON",
        ),
    ],
)
async def test_hostile_frames_under_chat_v1_bin_get_an_error_and_the_socket_goes_on(
    connect, alice, frame, message
):
    _, key = await adb(services.api_token_create)(user=alice)
    client = await connect(path=f"/ws/?token={key}", subprotocols=["chat.v1.bin"])
    communicator = client.communicator
    await communicator.receive_from()  # hello
    await communicator.send_to(**frame)
    error = await communicator.receive_from()
    code = protocol.FRAME_CODES["error"]
    assert (struct.unpack(">I", error[:4]), json.loads(error[4:])) == (
        (code,),
        {"code": "bad_request", "message": message},
    )
    await communicator.send_to(bytes_data=struct.pack(">I", 11) + b'{"ref":"p"}')
    assert await communicator.receive_from() == struct.pack(">I", 12) + b'{"ref":"p"}'


async def test_a_binary_frame_under_chat_v1_gets_an_error_and_the_socket_goes_on(
    connect, alice
):
    client = await connect(alice)
    await client.communicator.send_to(bytes_data=struct.pack(">I", 11) + b"{}")
    assert await client.recv() == error_frame(
        "bad_request", "chat.v1 takes JSON text frames only"
    )
    assert await client.request(type="ping", ref="p") == {"type": "pong", "ref": "p"}


@pytest.mark.parametrize("number", [2**53, 2**63, 10**30])
@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "join", "room": "lobby"}, "since"),
        ({"type": "history", "room": "lobby"}, "before"),
        ({"type": "edit", "room": "lobby", "body": "x"}, "id"),
        ({"type": "delete", "room": "lobby"}, "id"),
        ({"type": "read", "room": "lobby"}, "seq"),
    ],
)
async def test_a_number_past_2_53_is_bad_request_and_the_socket_goes_on(
    connect, alice, lobby, frame, field, number
):
    client = await connect(alice)
    reply = await client.request(**frame, **{field: number}, ref="big")
    assert reply == error_frame(
        "bad_request",
        f"{frame['type']}: Expected `int` <= 9007199254740991 - at `$.{field}`",
        ref="big",
    )
    assert await client.request(type="ping", ref="p") == {"type": "pong", "ref": "p"}
