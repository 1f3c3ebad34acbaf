"""Several real server processes behind one Redis: what crosses between them.

The module starts its own redis-server and two daphne processes (A and B) on the
test database; clients are real WebSocket connections (``ChatClient``s of the
``chat_client`` fixture, read in order). Every test commits its data
(``transaction=True``) so the server processes see it.
"""

import asyncio
import re
import time

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model

from chat import protocol, services
from chat.client import ChatClosed, ChatError
from chat.models import Message, Room
from chat.registry import live_connections
from tests.servers import DaphneServer, RedisServer, this_process_uses_redis
from tests.waiting import until

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

HEARTBEAT = 2  # seconds; dead processes' users go offline within twice this
TIMEOUT = 5  # seconds to wait for a frame that should come
QUIET = 0.4  # seconds of silence that show a frame does not come
# A server process's random id (8 hex digits), a dash, then its counter from 1.
CONNECTION_ID = re.compile(r"[0-9a-f]{8}-[1-9][0-9]*")


# --- servers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def daphne_start(redis_server, django_db_blocker):
    # database_url() reads the test database's connection settings.
    with django_db_blocker.unblock():
        server = DaphneServer(
            redis_url=redis_server.url, heartbeat=HEARTBEAT, verbosity=0
        )
    return server.start()


@pytest.fixture(scope="module")
def daphne_pair(django_db_setup, django_db_blocker, redis_server):
    servers = []
    try:
        for _ in range(2):
            servers.append(daphne_start(redis_server, django_db_blocker))
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(autouse=True)
def daphne_logs(daphne_pair):
    """Check A and B outlive each test; print what they logged during it.

    pytest shows the printed logs only when the test fails.
    """
    starts = [len(server.output()) for server in daphne_pair]
    yield
    for name, server, start in zip("AB", daphne_pair, starts, strict=True):
        print(f"--- daphne {name} log during the test ---\n{server.output()[start:]}")
    for name, server in zip("AB", daphne_pair, strict=True):
        assert server.alive(), f"daphne {name} died:\n{server.output()}"


@pytest.fixture
def server_a(daphne_pair):
    return daphne_pair[0]


@pytest.fixture
def server_b(daphne_pair):
    return daphne_pair[1]


@pytest.fixture
def server_c(django_db_setup, django_db_blocker, redis_server):
    """A third process of this test's own, free to kill."""
    server = daphne_start(redis_server, django_db_blocker)
    yield server
    print(f"--- daphne C log ---\n{server.output()}")
    server.stop()


# --- data ----------------------------------------------------------------------


@database_sync_to_async
def key_for(user):
    """The key of a new API token of ``user``."""
    return services.api_token_create(user=user)[1]


@database_sync_to_async
def user_with_key(username):
    """A new user and the key of an API token of theirs."""
    user = get_user_model().objects.create_user(username=username)
    return user, services.api_token_create(user=user)[1]


@database_sync_to_async
def room_create(slug):
    return services.room_create(slug=slug, title=f"Room {slug}")


@database_sync_to_async
def room_state(slug):
    """The room's last_seq and (seq, id, author id, client_msg_id) of its messages."""
    room = Room.objects.get(slug=slug)
    rows = Message.objects.filter(room=room).order_by("seq")
    fields = ("seq", "pk", "author_id", "client_msg_id")
    return room.last_seq, list(rows.values_list(*fields))


@database_sync_to_async
def stored_message(slug, seq):
    """The ``message`` frame of the stored message ``seq`` of the room ``slug``."""
    message = Message.objects.select_related("author").get(room__slug=slug, seq=seq)
    deleted = message.deleted_at is not None
    return {
        "type": "message",
        "room": slug,
        "id": message.pk,
        "seq": seq,
        "user": {"id": message.author.pk, "username": message.author.username},
        "body": "" if deleted else message.body,
        "created_at": protocol.timestamp(message.created_at),
        "client_msg_id": message.client_msg_id,
        "edited_at": protocol.timestamp(message.edited_at),
        "deleted": deleted,
        "mentions": [] if deleted else message.mention_names,
        "reactions": [] if deleted else message.reaction_summary,
        "reply_to": message.reply_to_id,
        "reply_count": message.reply_count,
        "attachments": [] if deleted else message.attachment_summary,
    }


def joined_frame(
    slug, *, online, last_seq=0, read_seq=0, unread=0, mentions=0, **extra
):
    """The ``joined`` frame of a public, open room made by ``room_create``."""
    return {
        "type": "joined",
        "room": slug,
        "title": f"Room {slug}",
        "last_seq": last_seq,
        "online": online,
        "online_count": len(online),
        "read_seq": read_seq,
        "unread": unread,
        "mentions": mentions,
        "private": False,
        "direct": False,
        "closed": False,
        **extra,
    }


# --- clients -------------------------------------------------------------------


async def join(client, room, *, skip=(), **extra):
    """Send ``join`` (with ``extra`` fields) and answer the ``joined`` that comes."""
    await client.send({"type": "join", "room": room, **extra})
    return await client.expect("joined", skip=skip, timeout=TIMEOUT)


def presence(room, user, status):
    return {"type": "presence", "room": room, "user": user, "status": status}


# --- tests -----------------------------------------------------------------------


async def test_message_sent_on_one_process_reaches_a_member_on_the_other(
    server_a, server_b, chat_client
):
    alice, alice_key = await user_with_key("alice")
    _, bob_key = await user_with_key("bob")
    await room_create("cross")
    on_a = await chat_client(server_a, alice_key, name="alice@A")
    on_b = await chat_client(server_b, bob_key, name="bob@B")
    await join(on_a, "cross")
    await join(on_b, "cross")
    assert await on_a.next_frame(TIMEOUT) == presence("cross", "bob", "online")

    await on_a.send(
        {
            "type": "send",
            "room": "cross",
            "body": "hello from A",
            "client_msg_id": "c-1",
            "ref": "s1",
        }
    )

    received = await on_b.next_frame(TIMEOUT)
    expected = await stored_message("cross", 1)
    assert expected == {
        **expected,
        "user": {"id": alice.pk, "username": "alice"},
        "body": "hello from A",
        "client_msg_id": "c-1",
    }
    assert received == expected
    # The sender gets the ack and its own message, in either order.
    own = sorted(
        [await on_a.next_frame(TIMEOUT), await on_a.next_frame(TIMEOUT)],
        key=lambda f: f["type"],
    )
    assert own[0] == {
        "type": "ack",
        "ref": "s1",
        "room": "cross",
        "client_msg_id": "c-1",
        "id": expected["id"],
        "seq": 1,
    }
    assert own[1] == expected
    await on_b.nothing(QUIET)


async def test_presence_crosses_processes_on_join_leave_and_disconnect(
    server_a, server_b, chat_client
):
    keys = {name: (await user_with_key(name))[1] for name in ["alice", "bob", "carol"]}
    await room_create("hall")
    alice = await chat_client(server_a, keys["alice"], name="alice@A")
    bob = await chat_client(server_b, keys["bob"], name="bob@B")

    joined = await join(alice, "hall", ref="j1")
    assert joined == joined_frame("hall", online=["alice"], ref="j1")
    # B lists a user who joined on A.
    assert (await join(bob, "hall"))["online"] == ["alice", "bob"]
    assert await alice.next_frame(TIMEOUT) == presence("hall", "bob", "online")

    # Join and leave on A reach B.
    carol = await chat_client(server_a, keys["carol"], name="carol@A")
    assert (await join(carol, "hall"))["online"] == ["alice", "bob", "carol"]
    assert await bob.next_frame(TIMEOUT) == presence("hall", "carol", "online")
    assert await alice.next_frame(TIMEOUT) == presence("hall", "carol", "online")
    await carol.send({"type": "leave", "room": "hall", "ref": "l1"})
    assert await carol.next_frame(TIMEOUT) == {
        "type": "left",
        "room": "hall",
        "ref": "l1",
    }
    assert await bob.next_frame(TIMEOUT) == presence("hall", "carol", "offline")
    assert await alice.next_frame(TIMEOUT) == presence("hall", "carol", "offline")

    # A second socket of bob's, on A, changes nothing for the others ...
    bob_again = await chat_client(server_a, keys["bob"], name="bob@A")
    assert (await join(bob_again, "hall"))["online"] == ["alice", "bob"]
    # ... nor does his socket on B going away, while the one on A stays.
    await bob.close()
    await alice.nothing(QUIET)
    assert (await join(carol, "hall"))["online"] == ["alice", "bob", "carol"]
    assert await alice.next_frame(TIMEOUT) == presence("hall", "carol", "online")
    assert await bob_again.next_frame(TIMEOUT) == presence("hall", "carol", "online")

    # A disconnect on B reaches A.
    carol_on_b = await chat_client(server_b, keys["carol"], name="carol@B")
    await join(carol_on_b, "hall")
    await carol.close()
    await alice.nothing(QUIET)  # carol is still there, through B
    await carol_on_b.close()
    assert await alice.next_frame(TIMEOUT) == presence("hall", "carol", "offline")
    assert await bob_again.next_frame(TIMEOUT) == presence("hall", "carol", "offline")

    # bob's last socket leaving, on A, reaches a fresh socket on B.
    carol_again = await chat_client(server_b, keys["carol"], name="carol@B2")
    assert (await join(carol_again, "hall"))["online"] == ["alice", "bob", "carol"]
    assert await alice.next_frame(TIMEOUT) == presence("hall", "carol", "online")
    assert await bob_again.next_frame(TIMEOUT) == presence("hall", "carol", "online")
    await bob_again.close()
    assert await carol_again.next_frame(TIMEOUT) == presence("hall", "bob", "offline")
    assert await alice.next_frame(TIMEOUT) == presence("hall", "bob", "offline")
    await alice.nothing(QUIET)
    await carol_again.nothing(QUIET)


async def test_a_big_room_gets_one_presence_batch_a_second_across_processes(
    server_a, server_b, chat_client
):
    # 56 users online in "arena", joining on both processes: past 50, a
    # watcher on each process gets the changes of the last 6 in one batch,
    # although half of them joined on the other process.
    await room_create("arena")
    servers = [server_a, server_b]
    clients = []
    for n in range(56):
        _, key = await user_with_key(f"a{n:02}")
        client = await chat_client(servers[n % 2], key, name=f"a{n:02}")
        joined = await join(client, "arena")
        clients.append(client)
    assert joined["online_count"] == 56
    for watcher in clients[:2]:
        frames = [
            await watcher.expect("presence_batch", skip=("presence",), timeout=TIMEOUT)
        ]
        assert frames == [
            {
                "type": "presence_batch",
                "room": "arena",
                "online": [f"a{n:02}" for n in range(50, 56)],
                "offline": [],
                "online_count": 56,
            }
        ]
    # One batch for the room, not one per process: nothing else comes.
    for watcher in clients[:2]:
        await watcher.nothing(QUIET)
    await clients[55].send({"type": "leave", "room": "arena"})
    await clients[54].send({"type": "leave", "room": "arena"})
    for watcher in clients[:2]:
        assert await watcher.expect(
            "presence_batch", skip=("presence",), timeout=TIMEOUT
        ) == {
            "type": "presence_batch",
            "room": "arena",
            "online": [],
            "offline": ["a54", "a55"],
            "online_count": 54,
        }


async def test_users_of_a_killed_process_go_offline_within_twice_the_heartbeat(
    server_a, server_b, server_c, chat_client
):
    keys = {name: (await user_with_key(name))[1] for name in ["alice", "bob", "carol"]}
    await room_create("doomed")
    alice = await chat_client(server_a, keys["alice"], name="alice@A")
    carol = await chat_client(server_b, keys["carol"], name="carol@B")
    bob = await chat_client(server_c, keys["bob"], name="bob@C")
    await join(alice, "doomed")
    await join(carol, "doomed")
    assert await alice.next_frame(TIMEOUT) == presence("doomed", "carol", "online")
    assert (await join(bob, "doomed"))["online"] == ["alice", "bob", "carol"]
    assert await alice.next_frame(TIMEOUT) == presence("doomed", "bob", "online")
    assert await carol.next_frame(TIMEOUT) == presence("doomed", "bob", "online")
    # No close frame: a closing handshake would start the server's own
    # disconnect, which the kill could cut between forgetting bob and telling
    # the room. The kill alone must make him go offline.
    bob.stop_pinging()

    killed_at = time.monotonic()
    server_c.kill()
    limit = 2 * HEARTBEAT
    for client in (alice, carol):
        assert await client.next_frame(limit + 1) == presence(
            "doomed", "bob", "offline"
        )
        elapsed = time.monotonic() - killed_at
        assert elapsed <= limit, f"{client.name}: offline after {elapsed:.2f}s"
    # Exactly one report, though both surviving processes sweep.
    await alice.nothing(QUIET)
    await carol.nothing(QUIET)

    dave_key = (await user_with_key("dave"))[1]
    dave = await chat_client(server_b, dave_key, name="dave@B")
    assert (await join(dave, "doomed"))["online"] == ["alice", "carol", "dave"]


async def test_join_since_on_the_other_process_recovers_exactly_the_missed_messages(
    server_a, server_b, chat_client
):
    keys = {name: (await user_with_key(name))[1] for name in ["alice", "bob"]}
    await room_create("recover")
    alice = await chat_client(server_a, keys["alice"], name="alice@A")
    bob = await chat_client(server_b, keys["bob"], name="bob@B")
    await join(alice, "recover")
    await join(bob, "recover")
    await alice.expect("presence", timeout=TIMEOUT)
    for n in (1, 2):
        await alice.send(
            {
                "type": "send",
                "room": "recover",
                "body": f"seen {n}",
                "client_msg_id": f"r{n}",
            }
        )
        await alice.expect("ack", skip=("message",), timeout=TIMEOUT)
        assert (await bob.expect("message", timeout=TIMEOUT))["seq"] == n
    last_seen = 2

    await bob.close()
    offline = await alice.expect("presence", skip=("message",), timeout=TIMEOUT)
    assert offline == presence("recover", "bob", "offline")
    for n in range(3, 8):
        await alice.send(
            {
                "type": "send",
                "room": "recover",
                "body": f"missed {n}",
                "client_msg_id": f"r{n}",
            }
        )
        ack = await alice.expect("ack", skip=("message",), timeout=TIMEOUT)
        assert ack["seq"] == n

    bob = await chat_client(server_a, keys["bob"], name="bob@A")
    joined = await join(bob, "recover", since=last_seen, ref="rejoin")
    # Bob joined at seq 0 and never read: all seven of alice's are unread.
    assert joined == joined_frame(
        "recover", online=["alice", "bob"], last_seq=7, unread=7, ref="rejoin"
    )
    for seq in range(3, 8):
        expected = await stored_message("recover", seq)
        assert expected["body"] == f"missed {seq}"
        assert await bob.next_frame(TIMEOUT) == expected
    assert await bob.next_frame(TIMEOUT) == {
        "type": "recovered",
        "room": "recover",
        "complete": True,
    }
    await bob.nothing(QUIET)


async def sender_run(client, room, msg_ids):
    """Fire every send at once, then collect the acks."""
    for msg_id in msg_ids:
        await client.send(
            {
                "type": "send",
                "room": room,
                "body": f"body {msg_id}",
                "client_msg_id": msg_id,
                "ref": msg_id,
            }
        )
    acks = []
    while len(acks) < len(msg_ids):
        acks.append(
            await client.expect("ack", skip=("message", "presence"), timeout=30)
        )
    return acks


async def receiver_run(client, count):
    """Seqs of the next ``count`` messages."""
    seqs = []
    while len(seqs) < count:
        frame = await client.expect("message", skip=("presence",), timeout=30)
        seqs.append(frame["seq"])
    return seqs


async def test_concurrent_sends_through_two_processes_get_seqs_one_to_a_hundred(
    server_a, server_b, chat_client
):
    room = "busy"
    await room_create(room)
    watchers = []
    for name, server in (("watch-a", server_a), ("watch-b", server_b)):
        key = (await user_with_key(name))[1]
        watcher = await chat_client(server, key, name=name)
        await join(watcher, room)
        watchers.append(watcher)
    # Five senders per process, ten messages each: 50 through A, 50 through B.
    senders, sent = [], {}
    for index in range(10):
        name = f"sender{index}"
        user, key = await user_with_key(name)
        server = server_a if index < 5 else server_b
        senders.append(
            await chat_client(server, key, name=f"{name}@{'AB'[index // 5]}")
        )
        sent[name] = (user, [f"{name}-{n}" for n in range(10)])

    # Every sender's join is answered before any send goes out, so the sends
    # all go out at once.
    await asyncio.gather(*(join(c, room, skip=("presence",)) for c in senders))
    runs = [
        asyncio.create_task(sender_run(client, room, sent[f"sender{i}"][1]))
        for i, client in enumerate(senders)
    ]
    receiving = [asyncio.create_task(receiver_run(w, 100)) for w in watchers]
    try:
        acks_per_sender = await asyncio.gather(*runs)
        seen = await asyncio.gather(*receiving)
    finally:
        for task in runs + receiving:
            task.cancel()

    # (seq, id, author id, client_msg_id) of every ack.
    acked = []
    for (name, (user, msg_ids)), sender_acks in zip(
        sent.items(), acks_per_sender, strict=True
    ):
        assert sorted(a["client_msg_id"] for a in sender_acks) == sorted(msg_ids), name
        for ack in sender_acks:
            assert ack == {
                "type": "ack",
                "ref": ack["client_msg_id"],
                "room": room,
                "client_msg_id": ack["client_msg_id"],
                "id": ack["id"],
                "seq": ack["seq"],
            }
            acked.append((ack["seq"], ack["id"], user.pk, ack["client_msg_id"]))
    assert len(acked) == 100
    assert sorted(seq for seq, *_ in acked) == list(range(1, 101))
    assert len({message_id for _, message_id, *_ in acked}) == 100
    for watcher_seqs in seen:
        assert sorted(watcher_seqs) == list(range(1, 101))
    last_seq, rows = await room_state(room)
    assert last_seq == 100
    assert rows == sorted(acked)

    # sender0 (on A) retries its first message through B: the same ack, nothing new.
    sender0, msg_ids = sent["sender0"]
    first_ack = next(a for a in acks_per_sender[0] if a["client_msg_id"] == msg_ids[0])
    retry = await chat_client(server_b, await key_for(sender0), name="sender0@B")
    await join(retry, room)
    await retry.send(
        {
            "type": "send",
            "room": room,
            "body": "body again",
            "client_msg_id": msg_ids[0],
            "ref": "retry",
        }
    )
    assert await retry.next_frame(TIMEOUT) == {**first_ack, "ref": "retry"}
    for watcher in watchers:
        await watcher.nothing(QUIET)
    assert await room_state(room) == (last_seq, rows)


# The last tests restart the module's Redis; keep them at the end.


async def until_typing_crosses(sender, receiver, username, room):
    deadline = time.monotonic() + 3 * HEARTBEAT + 2
    while True:
        await sender.send({"type": "typing", "room": room})
        try:
            frame = await receiver.next_frame(0.3)
        except ChatClosed:
            raise
        except ChatError:  # nothing within 0.3 s
            assert time.monotonic() < deadline, f"{username}'s frames never crossed"
            continue
        assert frame == {"type": "typing", "room": room, "user": username}
        return


async def test_delivery_and_presence_work_again_after_redis_restarts(
    server_a, server_b, redis_server, chat_client
):
    keys = {name: (await user_with_key(name))[1] for name in ["alice", "bob", "carol"]}
    await room_create("phoenix")
    alice = await chat_client(server_a, keys["alice"], name="alice@A")
    bob = await chat_client(server_b, keys["bob"], name="bob@B")
    await join(alice, "phoenix")
    await join(bob, "phoenix")
    assert await alice.next_frame(TIMEOUT) == presence("phoenix", "bob", "online")

    redis_server.restart()  # an empty Redis: no groups, no presence entries

    # Within a keeper round or two each process has put its state back: wait
    # until frames cross again both ways (each hub restores its own groups).
    await until_typing_crosses(alice, bob, "alice", "phoenix")
    await until_typing_crosses(bob, alice, "bob", "phoenix")
    await bob.send(
        {"type": "send", "room": "phoenix", "body": "back", "client_msg_id": "p1"}
    )
    # A typing frame of alice's sent before the one that crossed may come late.
    replies = {}
    while len(replies) < 2:
        frame = await bob.next_frame(TIMEOUT)
        if frame == {"type": "typing", "room": "phoenix", "user": "alice"}:
            continue
        assert frame["type"] not in replies, frame
        replies[frame["type"]] = frame
    assert set(replies) == {"ack", "message"}, replies
    ack, own = replies["ack"], replies["message"]
    expected = await stored_message("phoenix", 1)
    assert ack == {
        "type": "ack",
        "room": "phoenix",
        "client_msg_id": "p1",
        "id": expected["id"],
        "seq": 1,
    }
    assert own == expected
    assert await alice.expect("message", skip=("typing",), timeout=TIMEOUT) == expected
    carol = await chat_client(server_a, keys["carol"], name="carol@A")
    assert (await join(carol, "phoenix"))["online"] == ["alice", "bob", "carol"]


async def test_a_socket_that_fails_while_redis_is_down_leaves_no_ghost(
    server_a, server_b, redis_server, chat_client
):
    names = ["alice", "bob", "carol", "dave"]
    keys = {name: (await user_with_key(name))[1] for name in names}
    await room_create("outage")
    alice = await chat_client(server_a, keys["alice"], name="alice@A")
    bob = await chat_client(server_b, keys["bob"], name="bob@B")
    # dave stays on alice's process: its keeper vouches for him, not for her.
    dave = await chat_client(server_a, keys["dave"], name="dave@A")
    await join(alice, "outage")
    await join(bob, "outage")
    assert await alice.next_frame(TIMEOUT) == presence("outage", "bob", "online")
    await join(dave, "outage")
    assert await alice.next_frame(TIMEOUT) == presence("outage", "dave", "online")
    assert await bob.next_frame(TIMEOUT) == presence("outage", "dave", "online")

    redis_server.stop()
    try:
        # Nowhere to send it: the server closes the socket (1011).
        await alice.send({"type": "typing", "room": "outage"})
        code, _ = await alice.expect_close(timeout=TIMEOUT)
        assert code == 1011
    finally:
        redis_server.start()  # empty: no groups, no presence entries

    # Each process puts back what it vouches for at its next keeper round, in
    # one pipeline: once bob (B) and dave (A) are back, alice would be too.
    ids = {client.name: client.hello["connection_id"] for client in (alice, bob, dave)}
    vouched = {ids["bob@B"], ids["dave@A"]}
    with this_process_uses_redis(redis_server.url, heartbeat=HEARTBEAT):
        live = await until(
            live_connections,
            lambda rows: vouched <= {row["id"] for row in rows},
            timeout=2 * HEARTBEAT + 1,
            what="connections in the registry",
        )
    assert {row["id"] for row in live} & set(ids.values()) == vouched
    carol = await chat_client(server_b, keys["carol"], name="carol@B")
    assert (await join(carol, "outage"))["online"] == ["bob", "carol", "dave"]


async def test_a_users_socket_past_the_limit_on_either_process_closes_with_1013(
    server_a, server_b, chat_client
):
    from django.conf import settings

    limit = settings.CHAT_MAX_CONNECTIONS_PER_USER
    _, key = await user_with_key("many")
    for i in range(limit):
        await chat_client(server_a if i % 2 else server_b, key, name=f"socket {i}")
    for server in (server_a, server_b):
        # Closed before its hello.
        with pytest.raises(ChatClosed) as closed:
            await chat_client(server, key, name="one too many")
        assert (closed.value.code, closed.value.reason) == (
            1013,
            f"too many connections: at most {limit} per user",
        )


async def test_an_idle_process_neither_logs_nor_reconnects_its_layer(
    server_a, chat_client
):
    # The layer waits on Redis 5 s at a time; a client timeout at or below that
    # failed every wait, logged it and reconnected (a message popped at that
    # instant could be lost). Idle for more than two such waits, no failure.
    _, key = await user_with_key("idle")
    client = await chat_client(server_a, key, name="idle")
    logged = len(server_a.output())
    await client.nothing(timeout=12)  # idleness is what is under test
    assert "fan-out receive failed" not in server_a.output()[logged:]
    await client.send({"type": "ping", "ref": "p"})
    assert await client.next_frame(TIMEOUT) == {"type": "pong", "ref": "p"}
