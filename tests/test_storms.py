"""Storms on two real daphne processes behind one Redis: a big room filling at
once, and a deploy that sends half of it reconnecting to the other process.

Real sockets (``chat.client.ChatClient``, reconnecting and resuming as every
client does), real presence and fan-out. What is asserted is what users meet:
every member gets every message, nothing acknowledged is lost, joining costs
the others O(1) frames. How fast is the
benchmark's business (``make bench``: join storm, reconnect storm).
"""

import asyncio
import signal
import time

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model

from chat import services
from chat.client import FIRST_AFTER_GOING_AWAY_SECONDS
from chat.models import ApiToken, Room
from tests.clients import server_log
from tests.servers import DaphneServer, RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

TIMEOUT = 30  # seconds for a storm's every frame to arrive
# Long enough that no socket of a test is idle-closed.
HEARTBEAT = 120
BATCH_ABOVE = 50  # services.PRESENCE_BATCH_ABOVE


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def two_servers(django_db_blocker, redis_server):
    servers = []
    try:
        for _ in range(2):
            with django_db_blocker.unblock():
                server = DaphneServer(
                    redis_url=redis_server.url,
                    heartbeat=HEARTBEAT,
                    verbosity=0,
                    # One user's joins are not what is under test.
                    extra_env={"CHAT_RATE_LIMIT": "0"},
                )
            servers.append(server.start())
        yield servers
    finally:
        for server in servers:
            server.stop()


@database_sync_to_async
def members_create(count, prefix):
    """``count`` users, each with an API token: [(username, key)]."""
    User = get_user_model()
    names = [f"{prefix}{n:03}" for n in range(count)]
    User.objects.bulk_create(User(username=name) for name in names)
    users = User.objects.filter(username__in=names).order_by("username")
    keys = []
    tokens = []
    for user in users:
        key = ApiToken.new_key()
        keys.append((user.username, key))
        tokens.append(
            ApiToken(user=user, key_hash=ApiToken.hash_key(key), hint=key[:10])
        )
    ApiToken.objects.bulk_create(tokens)
    return keys


@database_sync_to_async
def room_create(slug):
    return services.room_create(slug=slug, title=slug)


@database_sync_to_async
def last_seq(slug):
    return Room.objects.get(slug=slug).last_seq


def all_frames(client):
    """Every frame a client received, socket after socket."""
    return [frame for socket in client.frames for frame in socket]


def seqs(client, room):
    """The seqs of the messages of ``room`` a client received, on any socket."""
    return {
        f["seq"]
        for f in all_frames(client)
        if f["type"] == "message" and f["room"] == room
    }


def online_view(client, room):
    """(names, count) as a client's frames on its socket tell them, in order."""
    names, count = set(), 0
    for frame in client.frames[-1]:
        if frame.get("room") != room:
            continue
        if frame["type"] == "joined":
            names, count = set(frame["online"]), frame["online_count"]
        elif frame["type"] == "presence":
            if frame["status"] == "online":
                names.add(frame["user"])
            else:
                names.discard(frame["user"])
            count = len(names)
        elif frame["type"] == "presence_batch":
            names |= set(frame["online"])
            names -= set(frame["offline"])
            count = frame["online_count"]
    return names, count


def logs_of(servers):
    """``explain`` for a member: the tails of every server's log."""
    return lambda: "\n".join(server_log(server)() for server in servers)


async def in_parallel(coroutines, at_once=100):
    """Run them all, at most ``at_once`` at a time (a storm, not a flood of SYNs)."""
    slots = asyncio.Semaphore(at_once)

    async def one(coroutine):
        async with slots:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


async def test_400_members_joining_at_once_over_two_processes_all_get_the_next_message(
    two_servers, chat_client
):
    await room_create("storm")
    pairs = await members_create(400, "m")

    def open_member(n, name, key):
        return chat_client(
            two_servers[n % 2],
            key,
            name=name,
            ordered=False,
            record=True,
            explain=logs_of(two_servers),
            # 400 handshakes at once on two processes: each may take up to TIMEOUT.
            connect_timeout=TIMEOUT,
        )

    first = await open_member(0, *pairs[0])
    await first.join("storm")
    rest = await in_parallel(
        open_member(n, *pair) for n, pair in enumerate(pairs[1:], start=1)
    )
    members = [first, *rest]
    started = time.monotonic()
    joins = await in_parallel(m.join("storm") for m in rest)
    storm_seconds = time.monotonic() - started
    assert {j["type"] for j in joins} == {"joined"}
    # joined lists at most 100 names, and counts every user online.
    assert max(len(j["online"]) for j in joins) == 100
    assert max(j["online_count"] for j in joins) == 400

    ack = await first.send_message(
        "storm", "after", client_msg_id="a1", timeout=TIMEOUT
    )
    assert ack["type"] == "ack", ack
    for member in members:
        await member.until(
            lambda m=member: ack["seq"] in seqs(m, "storm"),
            "the message",
            timeout=TIMEOUT,
        )
    # Exactly once each.
    for member in members:
        got = [f for f in all_frames(member) if f["type"] == "message"]
        assert [(f["seq"], f["body"]) for f in got] == [(ack["seq"], "after")]

    # The first member heard of every newcomer: per user up to 50 online,
    # then in batches, at most one a second for the room.
    await first.until(
        lambda: online_view(first, "storm")[1] == 400,
        "an online count of 400",
        timeout=TIMEOUT,
    )
    names, count = online_view(first, "storm")
    assert (len(names), count) == (400, 400)
    assert names == {name for name, _ in pairs}
    for member in members:
        kinds = [f["type"] for f in member.frames[-1]]
        # O(1) frames per join to the others, not one each per member.
        assert kinds.count("presence") <= BATCH_ABOVE
        assert kinds.count("presence_batch") <= storm_seconds + 3


async def test_a_deploy_sends_half_a_room_to_the_other_process_spread_losing_nothing(
    two_servers, chat_client
):
    stays, goes = two_servers
    await room_create("deploy")
    pairs = await members_create(300, "d")
    going = {name for name, _ in pairs[1:][::2]}

    def open_member(name, key):
        # Every member comes back as clients do: to the next of its urls, with
        # reconnect_delay's jitter, rejoining its rooms with since.
        server, other = (goes, stays) if name in going else (stays, goes)
        return chat_client(
            server,
            key,
            name=name,
            url=[server.ws_url, other.ws_url],
            ordered=False,
            reconnect=True,
            record=True,
            explain=logs_of(two_servers),
            # 300 handshakes at once, then 150 on one process within 2 s: as long.
            connect_timeout=TIMEOUT,
        )

    members = await in_parallel(open_member(*pair) for pair in pairs)
    sender, rest = members[0], members[1:]
    on_goes = rest[::2]
    assert {m.name for m in on_goes} == going
    joins = dict(
        zip(members, await in_parallel(m.join("deploy") for m in members), strict=True)
    )
    assert {j["type"] for j in joins.values()} == {"joined"}

    acked = []

    async def stream(stop):
        n = 0
        while not stop.is_set():
            n += 1
            ack = await sender.send_message(
                "deploy", f"b{n}", client_msg_id=f"s{n}", timeout=TIMEOUT
            )
            assert ack["type"] == "ack", ack
            acked.append(ack["seq"])
            await asyncio.sleep(0.02)

    stop = asyncio.Event()
    streaming = asyncio.create_task(stream(stop))
    await asyncio.sleep(0.5)

    goes.process.send_signal(signal.SIGTERM)  # as systemd does in a deploy
    dropped_at = time.monotonic()

    async def come_back(member):
        await member.until(lambda: member.closes, "the close", timeout=TIMEOUT)
        await member.until(
            lambda: (
                len(member.frames) > 1
                and any(f["type"] == "recovered" for f in member.frames[-1])
            ),
            "recovered",
            timeout=TIMEOUT,
        )

    await in_parallel((come_back(m) for m in on_goes), at_once=len(on_goes))
    await asyncio.sleep(0.3)
    stop.set()
    await streaming
    final = await last_seq("deploy")
    assert acked and acked[-1] == final

    # The process went away with 1001, and its sockets did not come back in
    # one instant: their first retry was spread over FIRST_AFTER_1001, each
    # back after one close and one reconnect.
    assert {m.closes[0][0] for m in on_goes} == {1001}
    assert {(len(m.closes), m.reconnects) for m in on_goes} == {(1, 1)}
    assert all(not m.closes for m in members if m not in on_goes)
    # The delay chosen before each first retry: the 1001 window's.
    assert all(m.retries[0][1] < FIRST_AFTER_GOING_AWAY_SECONDS for m in on_goes)
    delays = sorted(m.retries[0][0] - dropped_at for m in on_goes)
    assert delays[-1] - delays[0] > FIRST_AFTER_GOING_AWAY_SECONDS / 2
    assert delays[-1] < FIRST_AFTER_GOING_AWAY_SECONDS + 5

    # Nothing acknowledged is missed by anyone, live or recovered.
    for member in members:
        await member.until(
            lambda m=member: seqs(m, "deploy") >= set(acked),
            "every acked message",
            timeout=TIMEOUT,
        )
        joined = joins[member]
        assert seqs(member, "deploy") == set(range(joined["last_seq"] + 1, final + 1))
