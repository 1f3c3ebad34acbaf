"""The team-chat contract over two daphne processes sharing one Redis.

Unread counts exact after sends by others, own sends, deletes and read
markers; a mention notified to a user who is not in the room; reactions counted
once per user; threads paged; search visibility across public, private and
direct rooms; attachments served to a member, refused to a non-member and to
an anonymous visitor. Each user's sockets sit on the other process from the
actor's, so every event crosses the layer.
"""

import asyncio
import json
import urllib.error
import urllib.request

import pytest
from channels.db import database_sync_to_async

from chat import services
from chat.models import Room
from tests.test_multiprocess import room_create, user_with_key

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

TIMEOUT = 10


@pytest.fixture
def two_servers(start_daphne, own_redis, tmp_path):
    """Two processes on one Redis, sharing one media directory."""
    media = {"CHAT_MEDIA_ROOT": str(tmp_path / "media")}
    return tuple(
        start_daphne(redis_url=own_redis.url, extra_env=media) for _ in range(2)
    )


@pytest.fixture
async def people(two_servers, chat_client):
    """alice on the first process; bob and carol on the second."""
    first, second = two_servers
    found = {}
    for name, server in (("alice", first), ("bob", second), ("carol", second)):
        user, key = await user_with_key(name)
        found[name] = user, key, await chat_client(server, key, name=name)
    return found


async def until_frame(client, frame_type, *, room=None):
    """The next frame of ``frame_type`` (of ``room``), passing over the others."""
    while True:
        frame = await client.next_frame(TIMEOUT)
        if frame["type"] == frame_type and room in (None, frame.get("room")):
            return frame


async def rooms_of(client):
    reply = await client.request({"type": "rooms"})
    assert reply["type"] == "rooms", reply
    return {
        e["room"]: (e["read_seq"], e["unread"], e["mentions"]) for e in reply["rooms"]
    }


async def sent(client, room, body, **extra):
    """Send and wait for the ack (the message frame stays in the queue)."""
    frame = {"type": "send", "room": room, "body": body, **extra}
    frame["client_msg_id"] = frame["ref"] = f"{client.name}-{body}"
    ack = await client.request(frame)
    assert ack["type"] == "ack", ack
    return ack


async def test_unread_counts_stay_exact_across_processes(
    people, two_servers, chat_client
):
    (_, _, alice), (_, _, bob) = people["alice"], people["bob"]
    await room_create("lobby")
    assert (await alice.request({"type": "join", "room": "lobby"}))["unread"] == 0
    joined = await bob.request({"type": "join", "room": "lobby"})
    assert (joined["read_seq"], joined["unread"], joined["mentions"]) == (0, 0, 0)
    acks = [await sent(alice, "lobby", f"m{n}") for n in range(1, 6)]
    await until_frame(bob, "message", room="lobby")
    await sent(bob, "lobby", "mine")
    # Five of alice's; bob's own does not count; alice's count has only his.
    assert (await rooms_of(bob))["lobby"] == (0, 5, 0)
    assert (await rooms_of(alice))["lobby"] == (0, 1, 0)

    await alice.request({"type": "delete", "room": "lobby", "id": acks[0]["id"]})
    assert (await rooms_of(bob))["lobby"] == (0, 4, 0)

    # Bob reads on his second tab, on the other process: both tabs hear it.
    _, bob_key, _ = people["bob"]
    other_tab = await chat_client(two_servers[0], bob_key, name="bob's other tab")
    await other_tab.request({"type": "join", "room": "lobby"})
    await other_tab.send({"type": "read", "room": "lobby", "seq": 3})
    marker = {
        "type": "read_marker",
        "room": "lobby",
        "seq": 3,
        "unread": 2,  # m4 and m5; m1 deleted, m2 and m3 read
        "mentions": 0,
    }
    assert await until_frame(other_tab, "read_marker") == marker
    assert await until_frame(bob, "read_marker") == marker
    assert (await bob.request({"type": "join", "room": "lobby"}))["unread"] == 2
    assert (await rooms_of(bob))["lobby"] == (3, 2, 0)


async def test_a_mention_reaches_a_user_not_in_the_room_on_the_other_process(people):
    (_, _, alice), (_, _, bob), (_, _, carol) = (
        people["alice"],
        people["bob"],
        people["carol"],
    )
    await room_create("lobby")
    await alice.request({"type": "join", "room": "lobby"})
    await bob.request({"type": "join", "room": "lobby"})
    ack = await sent(alice, "lobby", "ping @carol and @bob")
    for client in (carol, bob):
        notification = await until_frame(client, "notification")
        assert (notification["kind"], notification["room"]) == ("mention", "lobby")
        assert notification["message"]["id"] == ack["id"]
        assert notification["message"]["mentions"] == ["carol", "bob"]
    assert (await rooms_of(bob))["lobby"] == (0, 1, 1)
    assert "lobby" not in await rooms_of(carol)  # mentioned, not a member


async def test_reactions_count_once_per_user_across_processes(people):
    (_, _, alice), (_, _, bob), (_, _, carol) = (
        people["alice"],
        people["bob"],
        people["carol"],
    )
    await room_create("lobby")
    for client in (alice, bob, carol):
        await client.request({"type": "join", "room": "lobby"})
    ack = await sent(alice, "lobby", "vote")
    react = {"type": "react", "room": "lobby", "id": ack["id"], "emoji": "👍"}
    results = await asyncio.gather(
        bob.request(react), bob.request(react), carol.request(react)
    )
    assert [r["type"] for r in results] == ["ack", "ack", "ack"]
    counts = []
    while len(counts) < 2:
        counts.append((await until_frame(alice, "reaction"))["count"])
    assert sorted(counts) == [1, 2]
    await alice.nothing(0.5)  # bob's second react changed nothing
    page = await alice.request({"type": "history", "room": "lobby"})
    [reaction] = page["messages"][0]["reactions"]
    assert (reaction["emoji"], reaction["count"], sorted(reaction["users"])) == (
        "👍",
        2,
        ["bob", "carol"],
    )


async def test_a_thread_is_paged_from_the_other_process(people):
    (_, _, alice), (_, _, bob) = people["alice"], people["bob"]
    await room_create("lobby")
    await alice.request({"type": "join", "room": "lobby"})
    await bob.request({"type": "join", "room": "lobby"})
    root = await sent(alice, "lobby", "question")
    replies = [
        await sent(alice, "lobby", f"answer {n}", reply_to=root["id"]) for n in range(3)
    ]
    await sent(alice, "lobby", "elsewhere")
    page = await bob.request(
        {"type": "history", "room": "lobby", "thread": root["id"], "limit": 2}
    )
    assert (page["thread"], page["has_more"]) == (root["id"], True)
    assert [m["id"] for m in page["messages"]] == [r["id"] for r in replies[1:]]
    older = await bob.request(
        {
            "type": "history",
            "room": "lobby",
            "thread": root["id"],
            "before": page["messages"][0]["seq"],
        }
    )
    assert ([m["id"] for m in older["messages"]], older["has_more"]) == (
        [replies[0]["id"]],
        False,
    )
    whole = await bob.request({"type": "history", "room": "lobby"})
    assert whole["messages"][0]["reply_count"] == 3


@database_sync_to_async
def private_room(slug, *members):
    room = services.room_create(slug=slug, title=slug, is_private=True)
    for user in members:
        services.membership_add(room=room, user=user)
    return room


async def test_search_sees_only_the_rooms_each_user_may_read(people):
    (alice_user, _, alice), (bob_user, _, bob), (_, _, carol) = (
        people["alice"],
        people["bob"],
        people["carol"],
    )
    await room_create("lobby")
    await private_room("staff", alice_user, bob_user)
    await alice.request({"type": "join", "room": "lobby"})
    await alice.request({"type": "join", "room": "staff"})
    await sent(alice, "lobby", "budget draft")
    await sent(alice, "staff", "budget final")
    dm = await alice.request(
        {"type": "dm", "to": "bob", "body": "budget secret", "client_msg_id": "d1"}
    )
    assert dm["type"] == "ack"

    async def found(client):
        reply = await client.request({"type": "search", "query": "Budget"})
        return [(m["room"], m["body"]) for m in reply["results"]]

    dm_slug = (await database_sync_to_async(Room.objects.get)(is_direct=True)).slug
    assert await found(bob) == [
        (dm_slug, "budget secret"),
        ("staff", "budget final"),
        ("lobby", "budget draft"),
    ]
    assert await found(carol) == [("lobby", "budget draft")]


def http_get(url, cookie=None):
    request = urllib.request.Request(url)
    if cookie is not None:
        request.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@database_sync_to_async
def session_cookie(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def upload_with_token(server, key, content, name):
    boundary = "chatsiteboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{name}"\r\nContent-Type: text/plain\r\n\r\n'
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{server.http_url}/api/uploads",
        data=body,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return response.status, json.loads(response.read())


async def test_an_attachment_is_served_to_a_member_only(people, two_servers):
    first, second = two_servers
    (alice_user, alice_key, alice), (bob_user, _, bob), (carol_user, _, _) = (
        people["alice"],
        people["bob"],
        people["carol"],
    )
    await private_room("staff", alice_user, bob_user)
    png = b"\x89PNG\r\n\x1a\n" + b"\x01" * 64
    status, attachment = await asyncio.to_thread(
        upload_with_token, first, alice_key, png, "chart.png"
    )
    assert (status, attachment["content_type"], attachment["size"]) == (
        201,
        "image/png",
        len(png),
    )
    await alice.request({"type": "join", "room": "staff"})
    await bob.request({"type": "join", "room": "staff"})
    ack = await sent(alice, "staff", "the chart", attachments=[attachment["id"]])
    message = await until_frame(bob, "message", room="staff")
    assert (message["id"], message["attachments"]) == (ack["id"], [attachment])
    # Served by the other process to the member; to an outsider of the private
    # room it is not there (404, as the room is not); anonymous: 403.
    url = f"{second.http_url}{attachment['url']}"
    member = await asyncio.to_thread(http_get, url, await session_cookie(bob_user))
    assert member == (200, png)
    outsider = await asyncio.to_thread(http_get, url, await session_cookie(carol_user))
    assert outsider[0] == 404
    assert (await asyncio.to_thread(http_get, url))[0] == 403
    unknown = f"{second.http_url}/uploads/{attachment['id'] + 1000}/chart.png"
    assert (await asyncio.to_thread(http_get, unknown))[0] == 404
