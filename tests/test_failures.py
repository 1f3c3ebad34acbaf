"""Failures of real processes, each bounded in time: a server killed mid-stream,
Redis stopped and restarted, PostgreSQL stopped and restarted.

Every test starts the processes it breaks (a redis-server, daphne processes, a
PostgreSQL cluster) and nothing else shares them. The daphne processes run with
the default heartbeat (30 s), as in production: how soon the keeper notices a
Redis that came back depends on it. Clients are real WebSocket connections.
"""

import asyncio
import itertools
import time

import pytest
import redis.asyncio
from channels.db import database_sync_to_async

from chat import push
from chat.client import ChatClient, ChatClosed, ChatError, ChatRefused
from chat.models import Message
from tests.clients import process_of
from tests.servers import (
    DaphneServer,
    PostgresServer,
    RedisServer,
    manage,
    this_process_uses_redis,
)
from tests.test_moderation_multiprocess import QUIET, alive, join
from tests.test_multiprocess import (
    TIMEOUT,
    joined_frame,
    room_create,
    room_state,
    stored_message,
    user_with_key,
)
from tests.test_multiprocess import presence as presence_frame
from tests.waiting import until

# --- servers -------------------------------------------------------------------


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def start_daphne(django_db_blocker):
    """``start_daphne(redis_url=…, …)`` → a running ``DaphneServer``, stopped after.

    pytest shows the printed logs only when the test fails.
    """
    servers = []

    def start(**options):
        # database_url() reads the test database's connection settings.
        with django_db_blocker.unblock():
            server = DaphneServer(**options)
        servers.append(server)
        return server.start()

    yield start
    for number, server in enumerate(servers):
        print(f"--- daphne {number} log ---\n{server.output()[-20000:]}")
        server.stop()


@pytest.fixture
async def open_socket(chat_client):
    """``await open_socket(server, name, key)`` → a connected ``ChatClient`` read
    in order, with no keep-alive pings, closed after the test."""

    async def open_(server, name, key):
        return await chat_client(server, key, name=name, keepalive=False)

    return open_


async def next_frame(socket, seconds):
    """The socket's next frame within ``seconds``, or None."""
    try:
        return await socket.next_frame(seconds)
    except ChatClosed:
        raise
    except ChatError:
        return None


async def handshake_answer(server, key):
    """How a new socket's handshake ends.

    ``("http", status)`` when refused before it opens, ``("close", code, reason)``
    when it opens and closes before ``hello``, ``("open", type)`` when served.
    """
    client = ChatClient(server.ws_url, token=key, reconnect=False, keepalive=False)
    try:
        await client.connect()
    except ChatRefused as refused:
        return ("http", refused.status)
    except ChatClosed as closed:
        return ("close", closed.code, closed.reason)
    await client.close()
    return ("open", client.hello["type"])


def history_entry(message_frame):
    """A ``message`` frame as ``history`` lists it: the same fields without type."""
    return {key: value for key, value in message_frame.items() if key != "type"}


# --- 1. SIGKILL of one of two processes mid-stream -------------------------------

ROOMS = ("stream-1", "stream-2")
WINDOW = 8  # sends a streaming client keeps in flight
ACKS_BEFORE_KILL = 20  # per client: the kill comes mid-stream, not at its start
SENDS_AFTER_RECONNECT = 20  # fresh sends of each client that moved


async def stream(client, sent, stop, *, fresh_after_reconnect=None):
    """Send to both rooms without pause until ``stop`` is set.

    ``WINDOW`` sends stay in flight (``send_message``: the next goes out as an
    ack comes back, an unacked one is sent again on the next socket), each with
    its own client_msg_id. With ``fresh_after_reconnect``, it ends once that many
    were first sent after the first socket ended. ``sent`` gets client_msg_id ->
    (room, how many of the client's sockets had ended when it was first sent).
    """
    numbers = itertools.count(1)
    fresh = 0

    async def one_in_flight():
        nonlocal fresh
        while not stop.is_set():
            if fresh_after_reconnect is not None and client.closes:
                if fresh >= fresh_after_reconnect:
                    return
                fresh += 1
            number = next(numbers)
            msg_id, room = f"{client.name}-{number}", ROOMS[number % 2]
            sent[msg_id] = (room, len(client.closes))
            await client.send_message(room, f"body {msg_id}", client_msg_id=msg_id)

    await asyncio.gather(*(one_in_flight() for _ in range(WINDOW)))


def frames_of(socket, frame_type):
    return [f for f in socket if f["type"] == frame_type]


def acked(socket):
    """client_msg_ids of the acks a socket received."""
    return {f["client_msg_id"] for f in frames_of(socket, "ack")}


def seqs(socket, room):
    """Seqs of the ``message`` frames of ``room`` the socket received, in order."""
    return [f["seq"] for f in frames_of(socket, "message") if f["room"] == room]


def every(client, frame_type):
    """The frames of ``frame_type`` of every socket of the client."""
    return [f for socket in client.frames for f in frames_of(socket, frame_type)]


@database_sync_to_async
def stored_rows():
    """(room slug, seq, id, author's username, client_msg_id) of every message."""
    fields = ("room__slug", "seq", "pk", "author__username", "client_msg_id")
    return list(Message.objects.order_by("room__slug", "seq").values_list(*fields))


async def stored_frames(rows):
    """The ``message`` frame of every stored message, by (room, seq)."""
    return {(room, seq): await stored_message(room, seq) for room, seq, *_ in rows}


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_clients_of_a_process_killed_mid_stream_resume_elsewhere_losing_nothing(
    redis_server, start_daphne, chat_client
):
    # The stream is faster than anyone types; the rate limit is not under test.
    options = {"redis_url": redis_server.url, "extra_env": {"CHAT_RATE_LIMIT": "0"}}
    server_a = start_daphne(**options)
    server_b = start_daphne(**options)
    for room in ROOMS:
        await room_create(room)
    # Each client keeps every frame per socket; one whose socket drops goes to
    # the next of its URLs: a client of B's to A.
    clients, sent = {}, {}
    for name, server, other in [
        ("a1", server_a, server_b),
        ("a2", server_a, server_b),
        ("b1", server_b, server_a),
        ("b2", server_b, server_a),
    ]:
        clients[name] = await chat_client(
            server,
            (await user_with_key(name))[1],
            name=name,
            url=[server.ws_url, other.ws_url],
            ordered=False,
            reconnect=True,
            record=True,
            keepalive=False,
        )
        sent[name] = {}
    for client in clients.values():
        for room in ROOMS:
            assert (await client.join(room))["type"] == "joined"
    on_a = [clients["a1"], clients["a2"]]
    moved = [clients["b1"], clients["b2"]]

    # The clients that move send SENDS_AFTER_RECONNECT fresh ones on A; the
    # others stream until those are all acknowledged.
    stop = asyncio.Event()
    streams = {
        name: asyncio.create_task(
            stream(
                client,
                sent[name],
                stop,
                fresh_after_reconnect=SENDS_AFTER_RECONNECT
                if client in moved
                else None,
            )
        )
        for name, client in clients.items()
    }
    for client in clients.values():
        await client.until(
            lambda c=client: len(acked(c.frames[0])) >= ACKS_BEFORE_KILL,
            "acks before the kill",
            timeout=30,
        )
    server_b.kill()
    for client in moved:
        await client.until(
            lambda c=client: c.closes, "the killed socket's end", timeout=30
        )
    # What the moved clients knew when their socket died: the sends it carried
    # that it never acknowledged, the highest seq it saw in each room.
    in_flight = {
        c.name: [
            msg_id
            for msg_id, (_, ended) in sent[c.name].items()
            if ended == 0 and msg_id not in acked(c.frames[0])
        ]
        for c in moved
    }
    since = {
        c.name: {room: max(seqs(c.frames[0], room), default=0) for room in ROOMS}
        for c in moved
    }
    for client in moved:
        assert in_flight[client.name], f"{client.name} had no send in flight"

    # The client reconnects to A on its own, resumes each room from the highest
    # seq seen, sends again what was never acknowledged (same client_msg_id),
    # and streams on.
    await asyncio.gather(*(streams[c.name] for c in moved))
    stop.set()
    await asyncio.gather(*streams.values())
    for client in moved:
        assert (client.reconnects, len(client.frames)) == (1, 2), client.closes
        assert process_of(client) == process_of(on_a[0]), client.hello
    for client in clients.values():
        assert client.unacked == {}, client.name

    rows = await stored_rows()
    frames = await stored_frames(rows)
    # History: each room's seqs run from 1 without a gap and end at its last_seq.
    for room in ROOMS:
        last_seq, _ = await room_state(room)
        assert [seq for slug, seq, *_ in rows if slug == room] == list(
            range(1, last_seq + 1)
        )
    # Every message sent is stored exactly once, and is the one its ack names.
    stored = {
        (author, msg_id): (slug, seq, pk) for slug, seq, pk, author, msg_id in rows
    }
    assert len(stored) == len(rows)
    assert set(stored) == {(name, msg_id) for name in sent for msg_id in sent[name]}
    for name, client in clients.items():
        acks = every(client, "ack")
        assert {ack["client_msg_id"] for ack in acks} == set(sent[name]), name
        for ack in acks:
            msg_id = ack["client_msg_id"]
            assert ack == {
                "type": "ack",
                "ref": msg_id,
                "room": sent[name][msg_id][0],
                "client_msg_id": msg_id,
                "id": stored[(name, msg_id)][2],
                "seq": stored[(name, msg_id)][1],
            }
        assert every(client, "error") == []

    # Messages B stored without its client hearing the ack may never have left
    # B (killed between commit and broadcast); every other message was
    # broadcast before it was acknowledged.
    uncertain = {
        stored[(name, msg_id)][:2]
        for name, msg_ids in in_flight.items()
        for msg_id in msg_ids
    }
    everything = {(slug, seq) for slug, seq, *_ in rows}
    await until_each_has_seen(on_a, everything - uncertain)
    for client in on_a:
        seen = [(f["room"], f["seq"]) for f in every(client, "message")]
        assert len(seen) == len(set(seen)), f"{client.name} got a message twice"
        assert everything - uncertain <= set(seen) <= everything
    for client in moved:
        since_of = since[client.name]
        resumed = client.frames[1]
        for room in ROOMS:
            last_seq = max(seq for slug, seq, *_ in rows if slug == room)
            # Every message after since, exactly, on the new socket: the
            # recovery, then the live stream (a seq may come twice, as
            # docs/protocol.md says around a join).
            expected = set(range(since_of[room] + 1, last_seq + 1))
            await client.until(
                lambda c=client, r=room, e=expected: set(seqs(c.frames[1], r)) >= e,
                f"every message of {room} after since",
                timeout=30,
            )
            assert set(seqs(resumed, room)) == expected, room
            # The client's own rejoin carries no ref.
            joined = next(
                f for f in resumed if f["type"] == "joined" and f["room"] == room
            )
            # Unread: the others' messages up to last_seq (this client never
            # sent read). Its own resends race the join's read by a few
            # messages at most; they are its own, so never unread.
            own = sum(
                1
                for slug, seq, _, author, _ in rows
                if slug == room and author == client.name and seq <= joined["last_seq"]
            )
            others = joined["last_seq"] - own
            assert others - len(in_flight[client.name]) <= joined["unread"] <= others
            assert joined == joined_frame(
                room,
                online=joined["online"],
                last_seq=joined["last_seq"],
                read_seq=0,
                unread=joined["unread"],
            )
            recovered = {"type": "recovered", "room": room, "complete": True}
            between = resumed[resumed.index(joined) + 1 : resumed.index(recovered)]
            recovery = {f["seq"] for f in between if f.get("room") == room}
            assert recovery >= set(range(since_of[room] + 1, joined["last_seq"] + 1))
            # Below since, all the socket that died missed is what never left B.
            seen_before = set(seqs(client.frames[0], room))
            missed = set(range(1, since_of[room] + 1)) - seen_before
            assert {(room, seq) for seq in missed} <= uncertain
    for client in clients.values():
        for frame in every(client, "message"):
            assert frame == frames[(frame["room"], frame["seq"])]


async def until_each_has_seen(clients, expected, timeout=30):
    for client in clients:
        await client.until(
            lambda c=client: (
                {(f["room"], f["seq"]) for f in every(c, "message")} >= expected
            ),
            "every broadcast message",
            timeout=timeout,
        )


# --- 2. Redis stopped for 10 s and started again ---------------------------------

OUTAGE_SECONDS = 10
RESUME_WITHIN = 5.0  # seconds after Redis is back: the bound
PROBE_FOR = 25.0  # seconds the probes go on, so a failure says how late it was
PROBE_EVERY = 0.5  # under the per-socket cap on typing (30 per 10 s)


def direct_slug(*users):
    low, high = sorted(user.pk for user in users)
    return f"dm-{low}-{high}"


async def until_delivery_resumes(carol, dave, frank, frank_user):
    """Seconds until frames cross again: A to B, B to A, and to C.

    Typing frames of carol's (A) must reach dave (B) and the other way round,
    through the room's group; a push must reach frank (C), through his user
    group. Nothing the probes send is stored.
    """
    started = time.monotonic()
    pending = {"A to B", "B to A", "to C"}
    resumed, other_frames = {}, []
    while pending and time.monotonic() - started < PROBE_FOR:
        round_started = time.monotonic()
        if "A to B" in pending:
            await carol.send({"type": "typing", "room": "outage"})
        if "B to A" in pending:
            await dave.send({"type": "typing", "room": "outage"})
        if "to C" in pending:
            await push.to_user(frank_user, "probe", {})
        probes = {
            "A to B": (dave, {"type": "typing", "room": "outage", "user": "carol"}),
            "B to A": (carol, {"type": "typing", "room": "outage", "user": "dave"}),
            "to C": (frank, {"type": "push", "event": "probe", "data": {}}),
        }
        for direction in sorted(pending):
            socket, probe = probes[direction]
            remaining = PROBE_EVERY - (time.monotonic() - round_started)
            while (frame := await next_frame(socket, max(remaining, 0.01))) is not None:
                if frame == probe:
                    resumed[direction] = round(time.monotonic() - started, 2)
                    pending.discard(direction)
                    break
                other_frames.append((socket.name, frame))
                remaining = PROBE_EVERY - (time.monotonic() - round_started)
        await asyncio.sleep(max(PROBE_EVERY - (time.monotonic() - round_started), 0))
    assert other_frames == []
    return resumed


async def ack_and_own_message(socket):
    """The ack of a send and the sender's own message frame, in either order."""
    frames = [await socket.expect(("ack", "message")) for _ in range(2)]
    frames.sort(key=lambda frame: frame["type"])
    assert [frame["type"] for frame in frames] == ["ack", "message"], frames
    return frames


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_redis_back_after_10_s_delivery_resumes_on_its_own_and_the_gap_fills(
    redis_server, start_daphne, open_socket
):
    server_a = start_daphne(redis_url=redis_server.url)
    server_b = start_daphne(redis_url=redis_server.url)
    # C holds one socket that joined no room: it hears direct messages, pushes.
    server_c = start_daphne(redis_url=redis_server.url)
    users, keys = {}, {}
    for name in ["alice", "bob", "carol", "dave", "frank", "erin"]:
        users[name], keys[name] = await user_with_key(name)
    await room_create("outage")
    alice = await open_socket(server_a, "alice@A", keys["alice"])
    carol = await open_socket(server_a, "carol@A", keys["carol"])
    bob = await open_socket(server_b, "bob@B", keys["bob"])
    dave = await open_socket(server_b, "dave@B", keys["dave"])
    frank = await open_socket(server_c, "frank@C", keys["frank"])
    for socket in (alice, bob, carol, dave):
        await join(socket, "outage", skip=("presence",))
    # Each hears of those who joined after it.
    for socket, later in ((alice, 3), (bob, 2), (carol, 1)):
        for _ in range(later):
            assert (await socket.next_frame())["type"] == "presence"
    dm = direct_slug(users["carol"], users["frank"])

    await alice.send(
        {
            "type": "send",
            "room": "outage",
            "body": "before",
            "client_msg_id": "before",
            "ref": "b",
        }
    )
    _, before = await ack_and_own_message(alice)
    assert before == await stored_message("outage", 1)
    for socket in (bob, carol, dave):
        assert await socket.next_frame() == before
    await carol.send(
        {"type": "dm", "to": "frank", "body": "hi", "client_msg_id": "dm-1", "ref": "d"}
    )
    await ack_and_own_message(carol)
    assert await frank.next_frame() == await stored_message(dm, 1)

    redis_server.stop()
    stopped_at = time.monotonic()
    # A send is stored, but its broadcast cannot leave: the sender's socket is
    # closed (1011) without its ack, and the client reconnects.
    await alice.send(
        {
            "type": "send",
            "room": "outage",
            "body": "during A",
            "client_msg_id": "during-a",
        }
    )
    assert await alice.expect_close() == (1011, "server error")
    await bob.send(
        {
            "type": "send",
            "room": "outage",
            "body": "during B",
            "client_msg_id": "during-b",
        }
    )
    assert await bob.expect_close() == (1011, "server error")
    # A new socket cannot be registered: it opens and closes at once (1011).
    assert await handshake_answer(server_a, keys["erin"]) == ("close", 1011, "")
    # The quiet sockets stay open; what needs no Redis is served.
    for socket in (carol, dave, frank):
        await alive(socket)
    await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - stopped_at))
    redis_server.start()  # the same port, empty: no groups, no presence

    # Nobody restarts anything: each process puts its groups back by itself.
    with this_process_uses_redis(redis_server.url):
        resumed = await until_delivery_resumes(carol, dave, frank, users["frank"])
    assert set(resumed) == {"A to B", "B to A", "to C"}, (
        f"delivery did not resume in {PROBE_FOR}s: {resumed}"
    )
    late = {d: s for d, s in resumed.items() if s > RESUME_WITHIN}
    assert late == {}, f"resumed more than {RESUME_WITHIN}s after Redis: {resumed}"

    # The sockets that stayed open are served again, not deaf: messages cross
    # both ways and a direct message reaches C.
    await carol.send(
        {
            "type": "send",
            "room": "outage",
            "body": "back A",
            "client_msg_id": "back-a",
            "ref": "ba",
        }
    )
    ack, own = await ack_and_own_message(carol)
    back_a = await stored_message("outage", 4)
    assert (ack, own) == (
        {
            "type": "ack",
            "ref": "ba",
            "room": "outage",
            "client_msg_id": "back-a",
            "id": back_a["id"],
            "seq": 4,
        },
        back_a,
    )
    assert await dave.next_frame() == back_a
    await dave.send(
        {
            "type": "send",
            "room": "outage",
            "body": "back B",
            "client_msg_id": "back-b",
            "ref": "bb",
        }
    )
    _, own = await ack_and_own_message(dave)
    back_b = await stored_message("outage", 5)
    assert own == back_b
    assert await carol.next_frame() == back_b
    await carol.send(
        {
            "type": "dm",
            "to": "frank",
            "body": "back",
            "client_msg_id": "dm-2",
            "ref": "d",
        }
    )
    await ack_and_own_message(carol)
    assert await frank.next_frame() == await stored_message(dm, 2)

    # The gap fills from the database, exactly: what was stored while Redis
    # was down (seqs 2 and 3) never crossed live.
    last_seq, rows = await room_state("outage")
    assert (last_seq, [row[3] for row in rows]) == (
        5,
        ["before", "during-a", "during-b", "back-a", "back-b"],
    )
    stored = [await stored_message("outage", seq) for seq in range(1, 6)]
    # alice reconnects and resumes from the last seq she saw.
    alice = await open_socket(server_a, "alice@A again", keys["alice"])
    # Unread to her: the three of the five that are not hers.
    assert await join(alice, "outage", since=1, ref="rejoin") == joined_frame(
        "outage", online=["alice", "carol", "dave"], last_seq=5, unread=3, ref="rejoin"
    )
    assert [await alice.next_frame() for _ in range(4)] == stored[1:]
    assert await alice.next_frame() == {
        "type": "recovered",
        "room": "outage",
        "complete": True,
    }
    # Her entry went with Redis's data, so she comes online again.
    for socket in (carol, dave):
        assert await socket.next_frame() == presence_frame("outage", "alice", "online")
    # Her unacknowledged send, sent again, gets the ack of the stored message.
    await alice.send(
        {
            "type": "send",
            "room": "outage",
            "body": "during A",
            "client_msg_id": "during-a",
            "ref": "r",
        }
    )
    assert await alice.next_frame() == {
        "type": "ack",
        "ref": "r",
        "room": "outage",
        "client_msg_id": "during-a",
        "id": stored[1]["id"],
        "seq": 2,
    }
    # dave saw 1, then 4: history before 4 gives what he missed.
    await dave.send({"type": "history", "room": "outage", "before": 4, "ref": "h"})
    assert await dave.next_frame() == {
        "type": "history",
        "room": "outage",
        "messages": [history_entry(frame) for frame in stored[:3]],
        "has_more": False,
        "ref": "h",
    }
    bob = await open_socket(server_b, "bob@B again", keys["bob"])
    await bob.send({"type": "history", "room": "outage", "ref": "h"})
    assert (await bob.next_frame())["messages"] == [history_entry(f) for f in stored]
    for socket in (alice, carol, dave, frank):
        await socket.nothing(QUIET)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_an_idle_process_neither_logs_nor_reconnects_to_redis_for_20_s(
    redis_server, start_daphne, open_socket
):
    # The layer's client timeout (15 s) is above channels-redis' 5 s blocking
    # receive; at or below it, every idle wait failed, logged and reconnected.
    server = start_daphne(redis_url=redis_server.url, verbosity=0)
    _, key = await user_with_key("idle")
    socket = await open_socket(server, "idle", key)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    own_id = await client.client_id()

    async def connections():
        listed = await client.client_list()
        return {int(c["id"]) for c in listed if int(c["id"]) != own_id}

    try:
        # Its hub waits on Redis (BZPOPMIN) once the first socket has opened.
        await until(
            client.client_list,
            lambda listed: any(c["cmd"] == "bzpopmin" for c in listed),
            timeout=TIMEOUT,
            what="the hub's blocking receive",
        )
        before = await connections()
        logged = len(server.output())
        await asyncio.sleep(20)  # idleness is what is under test
        after = await connections()
        log = server.output()[logged:]
    finally:
        await client.aclose()
    assert len(before) >= 2, before  # the layer's receive, presence
    assert after == before
    assert log == ""
    await alive(socket)


# --- 3. PostgreSQL stopped and started again -------------------------------------

# Runs on its own cluster whatever DATABASE_URL the suite runs on.
SETUP = """
from django.contrib.auth import get_user_model
from chat import services
User = get_user_model()
pat = User.objects.create_user(username="pat")
User.objects.create_user(username="quinn")
services.room_create(slug="lifeline", title="Room lifeline")
print(services.api_token_create(user=pat)[1])
"""
BACK_WITHIN = 5.0  # seconds after PostgreSQL is back until a send is acked
HANDSHAKES = 5


def unavailable(ref):
    return {
        "type": "error",
        "code": "unavailable",
        "message": "the database is unavailable: nothing was stored; try again",
        "retry_after": 1.0,
        "ref": ref,
    }


@pytest.fixture
def postgres():
    server = PostgresServer()
    try:
        yield server.init().start()
    finally:
        server.remove()


def stored_client_msg_ids(database):
    import psycopg

    with psycopg.connect(database) as conn:
        rows = conn.execute(
            f"SELECT client_msg_id FROM {Message._meta.db_table} ORDER BY seq"
        ).fetchall()
    return [row[0] for row in rows]


async def test_postgres_down_answers_unavailable_and_sends_are_acked_once_it_is_back(
    postgres, start_daphne, open_socket
):
    database = postgres.create_database("chatsite")
    manage("migrate", "--noinput", database_url=database)
    key = manage("shell", "-c", SETUP, database_url=database).split()[-1]
    server = start_daphne(extra_env={"DATABASE_URL": database})
    pat = await open_socket(server, "pat", key)
    assert await join(pat, "lifeline", ref="j") == joined_frame(
        "lifeline", online=["pat"], ref="j"
    )
    await pat.send(
        {
            "type": "send",
            "room": "lifeline",
            "body": "before",
            "client_msg_id": "before",
            "ref": "b",
        }
    )
    ack, before = await ack_and_own_message(pat)
    assert (ack["ref"], ack["seq"], before["client_msg_id"]) == ("b", 1, "before")

    postgres.stop()  # fast: every session ends at once
    log_start = len(server.output())
    for n in range(3):
        await pat.send(
            {
                "type": "send",
                "room": "lifeline",
                "body": f"refused {n}",
                "client_msg_id": f"refused-{n}",
                "ref": f"s{n}",
            }
        )
    assert [await pat.next_frame() for _ in range(3)] == [
        unavailable(f"s{n}") for n in range(3)
    ]
    for frame in (
        {"type": "history", "room": "lifeline"},
        {"type": "join", "room": "lifeline", "since": 0},
        {"type": "edit", "room": "lifeline", "id": before["id"], "body": "changed"},
        {"type": "delete", "room": "lifeline", "id": before["id"]},
        {"type": "read", "room": "lifeline", "seq": 1},
        {"type": "dm", "to": "quinn", "body": "hi", "client_msg_id": "dm-1"},
    ):
        await pat.send({**frame, "ref": frame["type"]})
        assert await pat.next_frame() == unavailable(frame["type"]), frame
    await alive(pat)  # the socket stays open and served

    # A new socket is told to come back (1013, with the reason), every time
    # alike, and each costs one line of log, not a traceback.
    answers = [await handshake_answer(server, key) for _ in range(HANDSHAKES)]
    assert answers == [("close", 1013, "database unavailable: try again")] * 5
    outage_log = server.output()[log_start:]
    assert outage_log.count("Traceback") == 0, outage_log
    assert outage_log.count("handshake: database unavailable: ") == HANDSHAKES
    await alive(pat)

    postgres.start()
    back_at = time.monotonic()
    # The same daphne process, never restarted: sends are acked again.
    retried = []
    while True:
        msg_id = f"after-{len(retried)}"
        await pat.send(
            {
                "type": "send",
                "room": "lifeline",
                "body": "after",
                "client_msg_id": msg_id,
                "ref": msg_id,
            }
        )
        frame = await pat.expect(("ack", "error"), skip=("message",))
        if frame["type"] == "ack":
            break
        assert frame == unavailable(msg_id)
        assert time.monotonic() - back_at < BACK_WITHIN, "still unavailable"
        retried.append(msg_id)
        await asyncio.sleep(frame["retry_after"])
    waited = time.monotonic() - back_at
    assert waited < BACK_WITHIN
    assert (frame["client_msg_id"], frame["seq"]) == (msg_id, 2)
    assert await handshake_answer(server, key) == ("open", "hello")

    # History holds what was acked, before and after; nothing refused.
    await pat.send({"type": "history", "room": "lifeline", "ref": "h"})
    history = await pat.expect("history", skip=("message",))
    assert [m["client_msg_id"] for m in history["messages"]] == ["before", msg_id]
    assert history["messages"][0] == history_entry(before)
    assert await asyncio.to_thread(stored_client_msg_ids, database) == [
        "before",
        msg_id,
    ]
