"""Unread counts, mentions, reactions and replies through the ASGI application.

The contract's second edition, case by case, on one process; the same cases
over two daphne processes are in ``tests/test_team_chat_live.py``.
"""

import os

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat import selectors, services
from chat.models import Membership, Mention, Message, Reaction
from tests.test_consumers import error_frame
from tests.test_multiprocess import stored_message

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async


async def send(client, body, msg_id, room="lobby", **extra):
    """Send; answer the ack (the sender's own copy of the message is read too)."""
    await client.send(
        type="send", room=room, body=body, client_msg_id=msg_id, ref=msg_id, **extra
    )
    frames = {}
    while "ack" not in frames or "message" not in frames:
        frame = await client.recv()
        if frame["type"] == "error":
            return frame
        frames[frame["type"]] = frame
    return frames["ack"]


async def edited_by(client):
    """The ack of the client's edit and its own copy of ``message_edited``."""
    frames = {}
    while "ack" not in frames or "message_edited" not in frames:
        frame = await client.recv()
        assert frame["type"] in ("ack", "message_edited", "presence"), frame
        frames[frame["type"]] = frame
    return frames["ack"]


# What a room sends its sockets unasked, passed over by ``next_of``.
ROOM_EVENTS = ("presence", "typing", "message", "message_deleted", "reaction")


async def next_of(client, frame_type):
    """The next frame of ``frame_type``, passing over the room's events."""
    while True:
        frame = await client.recv()
        if frame["type"] == frame_type:
            return frame
        assert frame["type"] in ROOM_EVENTS, frame


async def rooms_of(client):
    await client.send(type="rooms", ref="rooms")
    reply = await next_of(client, "rooms")
    assert reply["ref"] == "rooms"
    return {entry["room"]: entry for entry in reply["rooms"]}


def counts(entry):
    return (entry["read_seq"], entry["unread"], entry["mentions"])


# --- unread -----------------------------------------------------------------------


async def test_unread_counts_others_messages_not_own_nor_deleted(
    connect, alice, bob, lobby
):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    joined = await b.join("lobby")
    assert (joined["read_seq"], joined["unread"], joined["mentions"]) == (0, 0, 0)
    await b.send(type="leave", room="lobby")
    await next_of(b, "left")
    acks = [await send(a, f"m{n}", f"a{n}") for n in range(1, 5)]
    # Alice's own four are not unread to her; all four are to Bob.
    assert counts((await rooms_of(a))["lobby"]) == (0, 0, 0)
    assert counts((await rooms_of(b))["lobby"]) == (0, 4, 0)

    await a.send(type="delete", room="lobby", id=acks[1]["id"], ref="d")
    await next_of(a, "ack")
    assert counts((await rooms_of(b))["lobby"]) == (0, 3, 0)

    rejoined = await b.join("lobby")
    assert (rejoined["read_seq"], rejoined["unread"]) == (0, 3)
    assert (await send(b, "mine", "b2"))["seq"] == 5
    assert counts((await rooms_of(b))["lobby"]) == (0, 3, 0)

    # Reading up to seq 2 passes m1 (unread) and m2 (deleted): m3, m4 are left.
    await b.send(type="read", room="lobby", seq=2)
    marker = await next_of(b, "read_marker")
    assert marker == {
        "type": "read_marker",
        "room": "lobby",
        "seq": 2,
        "unread": 2,
        "mentions": 0,
    }
    await b.send(type="read", room="lobby", seq=5)
    assert (await next_of(b, "read_marker"))["unread"] == 0
    membership = await adb(Membership.objects.get)(room=lobby, user=bob)
    assert (membership.read_seq, membership.uncounted_after_read) == (5, 0)


async def test_a_new_member_starts_with_the_room_read(connect, alice, bob, lobby):
    a = await connect(alice)
    await a.join("lobby")
    for n in range(3):
        await send(a, f"before bob {n}", f"a{n}")
    b = await connect(bob)
    joined = await b.join("lobby")
    assert (joined["last_seq"], joined["read_seq"], joined["unread"]) == (3, 3, 0)
    await send(a, "after bob", "a9")
    assert counts((await rooms_of(b))["lobby"]) == (3, 1, 0)


async def test_rooms_lists_memberships_by_latest_activity_with_the_last_message(
    connect, alice, bob, lobby
):
    await adb(services.room_create)(slug="quiet", title="Quiet")
    a = await connect(alice)
    await a.join("quiet")
    await a.join("lobby")
    first = await send(a, "in lobby", "a1")
    await a.send(type="dm", to="bob", body="psst", client_msg_id="d1", ref="d1")
    await next_of(a, "ack")
    dm = f"dm-{min(alice.pk, bob.pk)}-{max(alice.pk, bob.pk)}"
    reply = await a.request(type="rooms", ref="r")
    assert [e["room"] for e in reply["rooms"]] == [dm, "lobby", "quiet"]
    direct, lobby_entry, quiet = reply["rooms"]
    assert direct == {
        "room": dm,
        "title": "alice & bob",
        "is_private": True,
        "is_direct": True,
        "last_seq": 1,
        "read_seq": 0,
        "unread": 0,
        "mentions": 0,
        "last_message": {
            k: v for k, v in (await stored_message(dm, 1)).items() if k != "type"
        },
    }
    assert lobby_entry["last_message"]["id"] == first["id"]
    assert (quiet["last_seq"], quiet["last_message"]) == (0, None)
    b = await connect(bob)
    assert [e["room"] for e in (await b.request(type="rooms"))["rooms"]] == [dm]
    assert counts((await rooms_of(b))[dm]) == (0, 1, 0)


async def test_a_room_banned_member_does_not_see_the_room_listed(
    connect, alice, bob, lobby
):
    b = await connect(bob)
    await b.join("lobby")
    await adb(services.room_ban)(room=lobby, user=bob, reason="spam", actor=alice)
    assert (await b.recv())["type"] == "removed"
    assert await rooms_of(b) == {}


# --- mentions ---------------------------------------------------------------------


async def test_a_mention_is_stored_carried_and_notified_to_a_user_not_in_the_room(
    connect, alice, bob, make_user, lobby
):
    carol = await adb(make_user)("carol")
    a = await connect(alice)
    b = await connect(bob)
    c = await connect(carol)  # has never joined the lobby
    await a.join("lobby")
    await b.join("lobby")
    await next_of(a, "presence")
    body = "hi @bob and @carol. mail me at alice@bob, @nobody, @alice"
    ack = await send(a, body, "a1")
    stored = await stored_message("lobby", ack["seq"])
    assert stored["mentions"] == ["bob", "carol", "alice"]
    assert await next_of(b, "message") == stored
    notification = {
        "type": "notification",
        "kind": "mention",
        "room": "lobby",
        "message": {k: v for k, v in stored.items() if k != "type"},
    }
    assert await next_of(b, "notification") == notification
    assert await c.recv() == notification
    assert await a.nothing() is True  # no notification of her own mention
    rows = await adb(list)(
        Mention.objects.order_by("user__username").values_list("user__username", "seq")
    )
    assert rows == [("alice", 1), ("bob", 1), ("carol", 1)]
    assert counts((await rooms_of(b))["lobby"]) == (0, 1, 1)
    assert "lobby" not in await rooms_of(c)
    await b.send(type="read", room="lobby", seq=1)
    assert (await next_of(b, "read_marker"))["mentions"] == 0


async def test_a_mention_of_someone_who_may_not_read_the_room_is_none(
    connect, alice, bob, make_user
):
    carol = await adb(make_user)("carol")
    await adb(services.room_create)(
        slug="staff", title="Staff", is_private=True, creator=alice
    )
    await adb(services.membership_add)(
        room=await adb(services.selectors.room_get)(slug="staff"), user=bob
    )
    a = await connect(alice)
    c = await connect(carol)
    await a.join("staff")
    ack = await send(a, "@bob @carol", "a1", room="staff")
    assert (await stored_message("staff", ack["seq"]))["mentions"] == ["bob"]
    assert await c.nothing() is True


async def test_deleting_a_message_that_mentions_me_takes_it_off_my_count(
    connect, alice, bob, lobby
):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    ack = await send(a, "@bob look", "a1")
    await send(a, "@bob again", "a2")
    for seq in (1, 2):
        assert (await next_of(b, "notification"))["message"]["seq"] == seq
    assert counts((await rooms_of(b))["lobby"]) == (0, 2, 2)
    await a.send(type="delete", room="lobby", id=ack["id"], ref="d")
    await next_of(a, "ack")
    assert counts((await rooms_of(b))["lobby"]) == (0, 1, 1)
    deleted = await stored_message("lobby", 1)
    assert (deleted["deleted"], deleted["mentions"]) == (True, [])


async def test_an_edit_reads_the_mentions_again_counting_and_notifying_the_new(
    connect, alice, bob, make_user, lobby
):
    carol = await adb(make_user)("carol")
    dave = await adb(make_user)("dave")
    a = await connect(alice)
    b = await connect(bob)
    c = await connect(carol)
    d = await connect(dave)
    await a.join("lobby")
    await b.join("lobby")
    await c.join("lobby")
    ack = await send(a, "@bob and @dave, look", "a1")
    assert (await next_of(b, "notification"))["message"]["mentions"] == ["bob", "dave"]
    assert (await d.recv())["type"] == "notification"
    assert counts((await rooms_of(b))["lobby"]) == (0, 1, 1)
    # Dave has read it since: dropping him later leaves his count alone.
    await d.join("lobby")
    await d.send(type="read", room="lobby", seq=1)
    assert (await next_of(d, "read_marker"))["mentions"] == 0

    await a.send(
        type="edit", room="lobby", id=ack["id"], body="@carol, @dave: look", ref="e"
    )
    await edited_by(a)
    stored = await stored_message("lobby", 1)
    assert stored["mentions"] == ["carol", "dave"]
    edited = await next_of(b, "message_edited")
    assert edited == {
        "type": "message_edited",
        "room": "lobby",
        "id": ack["id"],
        "seq": 1,
        "body": "@carol, @dave: look",
        "edited_at": stored["edited_at"],
        "mentions": ["carol", "dave"],
    }
    # Carol is new to it: counted and told; Dave was named before: not again.
    assert await next_of(c, "message_edited") == edited
    assert await c.recv() == {
        "type": "notification",
        "kind": "mention",
        "room": "lobby",
        "message": {k: v for k, v in stored.items() if k != "type"},
    }
    assert await next_of(d, "message_edited") == edited
    assert await d.nothing() is True
    assert await b.nothing() is True
    assert counts((await rooms_of(b))["lobby"]) == (0, 1, 0)
    assert counts((await rooms_of(c))["lobby"]) == (0, 1, 1)
    assert counts((await rooms_of(d))["lobby"]) == (1, 0, 0)
    rows = await adb(list)(
        Mention.objects.order_by("user__username").values_list("user__username", "seq")
    )
    assert rows == [("carol", 1), ("dave", 1)]

    # An edit that names nobody takes every mention away.
    await a.send(type="edit", room="lobby", id=ack["id"], body="look", ref="e2")
    await edited_by(a)
    assert (await next_of(c, "message_edited"))["mentions"] == []
    assert counts((await rooms_of(c))["lobby"]) == (0, 1, 0)
    assert await adb(Mention.objects.count)() == 0
    assert (await stored_message("lobby", 1))["mentions"] == []


# --- reactions ----------------------------------------------------------------------


async def test_reactions_count_each_user_once_and_show_in_history(
    connect, alice, bob, lobby
):
    a = await connect(alice)
    b = await connect(bob)
    await a.join("lobby")
    await b.join("lobby")
    await next_of(a, "presence")
    ack = await send(a, "react to me", "a1")
    await next_of(b, "message")

    react = {"type": "react", "room": "lobby", "id": ack["id"], "emoji": "👍"}
    await b.send(**react, ref="r1")
    # The room hears of it as it commits, the sender's ack follows.
    reaction_seen, reply = await b.recv(), await b.recv()
    assert reply == {
        "type": "ack",
        "ref": "r1",
        "room": "lobby",
        "client_msg_id": "a1",
        "id": ack["id"],
        "seq": 1,
    }
    reaction = {
        "type": "reaction",
        "room": "lobby",
        "id": ack["id"],
        "seq": 1,
        "emoji": "👍",
        "user": "bob",
        "on": True,
        "count": 1,
    }
    assert await a.recv() == reaction
    assert reaction_seen == reaction
    # Twice is one reaction: acknowledged, nothing changes, nothing is sent.
    assert (await b.request(**react, ref="r2"))["type"] == "ack"
    assert await a.nothing() is True
    await a.send(**react, ref="r3")
    assert await a.recv() == {**reaction, "user": "alice", "count": 2}
    await next_of(a, "ack")
    await a.send(**{**react, "emoji": "🎉"}, ref="r4")
    await next_of(a, "ack")

    page = await a.request(type="history", room="lobby", ref="h")
    assert page["messages"][0]["reactions"] == [
        {"emoji": "👍", "count": 2, "users": ["bob", "alice"]},
        {"emoji": "🎉", "count": 1, "users": ["alice"]},
    ]
    assert [await b.recv(), await b.recv()] == [
        {**reaction, "user": "alice", "count": 2},
        {**reaction, "emoji": "🎉", "user": "alice", "count": 1},
    ]
    await b.send(**react, on=False, ref="r5")
    assert await b.recv() == {**reaction, "on": False, "count": 1}
    assert await adb(Reaction.objects.count)() == 2


async def test_a_reaction_needs_the_room_joined_and_a_live_message(
    connect, alice, lobby
):
    a = await connect(alice)
    react = {"type": "react", "room": "lobby", "id": 1, "emoji": "👍"}
    assert await a.request(**react) == error_frame(
        "not_joined", "join room 'lobby' first"
    )
    await a.join("lobby")
    assert await a.request(**react) == error_frame(
        "not_found", "no message 1 in room 'lobby'"
    )
    bad = await a.request(**{**react, "emoji": "two words"})
    assert (bad["type"], bad["code"]) == ("error", "bad_request")
    long = await a.request(**{**react, "emoji": "x" * 17})
    assert (long["type"], long["code"]) == ("error", "bad_request")


# --- replies ------------------------------------------------------------------------


async def test_replies_are_counted_on_their_thread_and_paged_with_history(
    connect, alice, bob, lobby
):
    a = await connect(alice)
    await a.join("lobby")
    parent = await send(a, "a question", "a1")
    first = await send(a, "an answer", "a2", reply_to=parent["id"])
    # A reply to a reply goes to the thread of the first message.
    second = await send(a, "another", "a3", reply_to=first["id"])
    await send(a, "not in the thread", "a4")
    replies = [await stored_message("lobby", n) for n in (2, 3)]
    assert [r["reply_to"] for r in replies] == [parent["id"], parent["id"]]
    assert (await stored_message("lobby", 1))["reply_count"] == 2

    thread = await a.request(type="history", room="lobby", thread=parent["id"], ref="t")
    assert thread == {
        "type": "history",
        "room": "lobby",
        "messages": [{k: v for k, v in r.items() if k != "type"} for r in replies],
        "has_more": False,
        "ref": "t",
        "thread": parent["id"],
    }
    older = await a.request(
        type="history", room="lobby", thread=parent["id"], before=3, limit=1
    )
    assert ([m["id"] for m in older["messages"]], older["has_more"]) == (
        [first["id"]],
        False,
    )
    assert second["seq"] == 3


async def test_a_reply_to_a_message_of_another_room_or_none_is_not_found(
    connect, alice, lobby
):
    await adb(services.room_create)(slug="other", title="Other")
    a = await connect(alice)
    await a.join("lobby")
    await a.join("other")
    elsewhere = await send(a, "over there", "o1", room="other")
    refused = await send(a, "reply", "a1", reply_to=elsewhere["id"])
    assert refused == error_frame(
        "not_found", f"no message {elsewhere['id']} in room 'lobby'", ref="a1"
    )
    assert await send(a, "reply", "a2", reply_to=999) == error_frame(
        "not_found", "no message 999 in room 'lobby'", ref="a2"
    )
    assert await adb(Message.objects.filter(room__slug="lobby").count)() == 0
    unknown = await a.request(type="history", room="lobby", thread=999, ref="t")
    assert unknown == error_frame(
        "not_found", "no message 999 in room 'lobby'", ref="t"
    )


# --- search -------------------------------------------------------------------------


async def search(client, query, **extra):
    await client.send(type="search", query=query, ref="s", **extra)
    reply = await next_of(client, "search")
    assert (reply["query"], reply["ref"]) == (query, "s")
    return [(m["room"], m["body"]) for m in reply["results"]], reply["has_more"]


async def test_search_matches_whole_words_in_readable_rooms_newest_first(
    connect, alice, bob, make_user, lobby
):
    carol = await adb(make_user)("carol")
    await adb(services.room_create)(
        slug="staff", title="Staff", is_private=True, creator=alice
    )
    a = await connect(alice)
    await a.join("lobby")
    await a.join("staff")
    await send(a, "The Deploy went fine", "a1")
    await send(a, "deploying again tomorrow", "a2")
    await send(a, "deploy of the staff tools", "a3", room="staff")
    gone = await send(a, "a deploy nobody should see", "a4")
    await a.send(type="delete", room="lobby", id=gone["id"], ref="d")
    await next_of(a, "ack")
    await a.send(type="dm", to="bob", body="deploy secrets", client_msg_id="d1")
    await next_of(a, "ack")
    dm = f"dm-{min(alice.pk, bob.pk)}-{max(alice.pk, bob.pk)}"

    # Whole words, any case; "deploying" is another word; deleted never match.
    assert await search(a, "DEPLOY") == (
        [
            (dm, "deploy secrets"),
            ("staff", "deploy of the staff tools"),
            ("lobby", "The Deploy went fine"),
        ],
        False,
    )
    b = await connect(bob)
    assert await search(b, "deploy") == (
        [(dm, "deploy secrets"), ("lobby", "The Deploy went fine")],
        False,
    )
    c = await connect(carol)
    assert await search(c, "deploy") == ([("lobby", "The Deploy went fine")], False)
    # Every word must be there.
    assert await search(a, "fine deploy") == (
        [("lobby", "The Deploy went fine")],
        False,
    )
    assert await search(a, "deploy nowhere") == ([], False)
    assert await search(a, "deploy", room="staff") == (
        [("staff", "deploy of the staff tools")],
        False,
    )
    refused = await c.request(type="search", query="deploy", room="staff", ref="s")
    assert refused == error_frame("forbidden", "room 'staff' is private", ref="s")


async def test_search_pages_back_with_before(connect, alice, lobby):
    a = await connect(alice)
    await a.join("lobby")
    acks = [await send(a, f"release note {n}", f"a{n}") for n in range(5)]
    await a.send(type="search", query="release", limit=2, ref="s")
    page = await next_of(a, "search")
    assert [m["id"] for m in page["results"]] == [acks[4]["id"], acks[3]["id"]]
    assert page["has_more"] is True
    await a.send(type="search", query="release", before=acks[3]["id"], limit=2)
    page = await next_of(a, "search")
    assert [m["id"] for m in page["results"]] == [acks[2]["id"], acks[1]["id"]]
    await a.send(type="search", query="release", before=acks[1]["id"], limit=2)
    page = await next_of(a, "search")
    assert ([m["id"] for m in page["results"]], page["has_more"]) == (
        [acks[0]["id"]],
        False,
    )
    assert page["results"][0] == {
        k: v for k, v in (await stored_message("lobby", 1)).items() if k != "type"
    }
    nothing = await a.request(type="search", query="!!!", ref="x")
    assert nothing == error_frame(
        "bad_request", "search: the query has no words", ref="x"
    )


@pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres"),
    reason="the full-text index is PostgreSQL's; SQLite matches words by regex",
)
def test_on_postgresql_search_is_answered_from_the_full_text_index(alice, lobby):
    with CaptureQueriesContext(connection) as queries:
        selectors.message_search(user=alice, query="deploy tools")
    [sql] = [q["sql"] for q in queries.captured_queries if "to_tsvector" in q["sql"]]
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # a tiny table: make it choose
        try:
            cursor.execute(f"EXPLAIN {sql}")
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            cursor.execute("SET enable_seqscan = on")
    assert "chat_message_body_search" in plan, plan
