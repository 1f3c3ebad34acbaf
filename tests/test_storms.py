"""Storms on two real daphne processes behind one Redis: a big room filling at
once, and a deploy that sends half of it reconnecting to the other process.

Real sockets (the ``websockets`` client), real presence and fan-out. What is
asserted is what users meet: every member gets every message, nothing
acknowledged is lost, joining costs the others O(1) frames. How fast is the
benchmark's business (``make bench``: join storm, reconnect storm).
"""

import asyncio
import json
import signal
import time

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chat import services
from chat.client import FIRST_AFTER_GOING_AWAY_SECONDS, reconnect_delay
from chat.models import ApiToken, Room
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


class Member:
    """One user's socket(s): every frame, per socket, and what it knows of a room."""

    def __init__(self, username, key):
        self.username = username
        self.key = key
        self.sockets = []  # per socket opened, the frames it received
        self.closes = []  # per socket that ended, its close code
        self.websocket = None
        self.changed = asyncio.Event()
        self.reconnected_at = None

    async def open(self, server):
        url = f"{server.ws_url}?token={self.key}"
        self.websocket = await asyncio.wait_for(
            connect(url, max_queue=None, close_timeout=2, ping_interval=None), TIMEOUT
        )
        hello = json.loads(await asyncio.wait_for(self.websocket.recv(), TIMEOUT))
        assert hello["type"] == "hello", hello
        self.frames = []
        self.sockets.append(self.frames)
        self.reader = asyncio.create_task(self._read(self.websocket, self.frames))

    async def _read(self, websocket, frames):
        try:
            async for raw in websocket:
                frames.append(json.loads(raw))
                self.changed.set()
        except ConnectionClosed:
            pass
        self.closes.append(websocket.close_code)
        self.changed.set()

    async def reconnect(self, server, close_code):
        """Come back as every client does: full-jitter backoff, then open again."""
        attempt = 0
        while True:
            await asyncio.sleep(reconnect_delay(attempt, close_code))
            try:
                if self.reconnected_at is None:  # the first retry's time
                    self.reconnected_at = time.monotonic()
                await self.open(server)
                return attempt
            except (OSError, TimeoutError):
                attempt += 1
                close_code = None

    async def until(self, condition, what, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.username}: {what} not within {timeout}s")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass

    async def send(self, **frame):
        await self.websocket.send(json.dumps(frame))

    async def join(self, room, **extra):
        await self.send(type="join", room=room, ref=f"join-{room}", **extra)
        frames = self.frames
        await self.until(
            lambda: any(f.get("ref") == f"join-{room}" for f in frames), "joined"
        )
        return next(f for f in frames if f.get("ref") == f"join-{room}")

    def all_frames(self):
        return [frame for socket in self.sockets for frame in socket]

    def seqs(self, room):
        return {
            f["seq"]
            for f in self.all_frames()
            if f["type"] == "message" and f["room"] == room
        }

    def online_view(self, room):
        """(names, count) as this member's frames tell them, in order."""
        names, count = set(), 0
        for frame in self.frames:
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

    async def close(self):
        if self.websocket is not None:
            await self.websocket.close()


async def in_parallel(coroutines, at_once=100):
    """Run them all, at most ``at_once`` at a time (a storm, not a flood of SYNs)."""
    slots = asyncio.Semaphore(at_once)

    async def one(coroutine):
        async with slots:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


async def test_400_members_joining_at_once_over_two_processes_all_get_the_next_message(
    two_servers,
):
    server_a, server_b = two_servers
    await room_create("storm")
    members = [Member(*pair) for pair in await members_create(400, "m")]
    first, rest = members[0], members[1:]
    try:
        await first.open(server_a)
        await first.join("storm")
        await in_parallel(
            m.open(two_servers[n % 2]) for n, m in enumerate(rest, start=1)
        )
        started = time.monotonic()
        joins = await in_parallel(m.join("storm") for m in rest)
        storm_seconds = time.monotonic() - started
        assert {j["type"] for j in joins} == {"joined"}
        # joined lists at most 100 names, and counts every user online.
        assert max(len(j["online"]) for j in joins) == 100
        assert max(j["online_count"] for j in joins) == 400

        await first.send(type="send", room="storm", body="after", client_msg_id="a1")
        await first.until(
            lambda: any(f["type"] == "ack" for f in first.frames), "the ack"
        )
        ack = next(f for f in first.frames if f["type"] == "ack")
        for member in members:
            await member.until(
                lambda m=member: ack["seq"] in m.seqs("storm"), "the message"
            )
        # Exactly once each.
        for member in members:
            got = [f for f in member.frames if f["type"] == "message"]
            assert [(f["seq"], f["body"]) for f in got] == [(ack["seq"], "after")]

        # The first member heard of every newcomer: per user up to 50 online,
        # then in batches, at most one a second for the room.
        await first.until(
            lambda: first.online_view("storm")[1] == 400, "an online count of 400"
        )
        names, count = first.online_view("storm")
        assert (len(names), count) == (400, 400)
        assert names == {m.username for m in members}
        for member in members:
            kinds = [f["type"] for f in member.frames]
            # O(1) frames per join to the others, not one each per member.
            assert kinds.count("presence") <= BATCH_ABOVE
            assert kinds.count("presence_batch") <= storm_seconds + 3
    finally:
        await in_parallel(m.close() for m in members)


async def test_a_deploy_sends_half_a_room_to_the_other_process_spread_losing_nothing(
    two_servers,
):
    stays, goes = two_servers
    await room_create("deploy")
    members = [Member(*pair) for pair in await members_create(300, "d")]
    sender, rest = members[0], members[1:]
    on_goes = rest[::2]
    try:
        await in_parallel(
            m.open(goes if m in on_goes else stays) for m in [sender, *rest]
        )
        await in_parallel(m.join("deploy") for m in members)

        acked = []

        async def stream(stop):
            n = 0
            while not stop.is_set():
                n += 1
                frames = sender.frames
                await sender.send(
                    type="send",
                    room="deploy",
                    body=f"b{n}",
                    client_msg_id=f"s{n}",
                    ref=f"s{n}",
                )
                await sender.until(
                    lambda r=f"s{n}", fs=frames: any(
                        f.get("ref") == r and f["type"] == "ack" for f in fs
                    ),
                    f"the ack of s{n}",
                )
                acked.append(next(f["seq"] for f in frames if f.get("ref") == f"s{n}"))
                await asyncio.sleep(0.02)

        stop = asyncio.Event()
        streaming = asyncio.create_task(stream(stop))
        await asyncio.sleep(0.5)

        goes.process.send_signal(signal.SIGTERM)  # as systemd does in a deploy
        dropped_at = time.monotonic()

        async def come_back(member):
            await member.until(lambda: member.closes, "the close")
            seen = max(member.seqs("deploy"), default=0)
            await member.reconnect(stays, member.closes[-1])
            await member.join("deploy", since=seen)
            await member.until(
                lambda: any(f["type"] == "recovered" for f in member.frames),
                "recovered",
            )

        await in_parallel((come_back(m) for m in on_goes), at_once=len(on_goes))
        await asyncio.sleep(0.3)
        stop.set()
        await streaming
        final = await last_seq("deploy")
        assert acked and acked[-1] == final

        # The process went away with 1001, and its sockets did not come back in
        # one instant: their first retry was spread over FIRST_AFTER_1001.
        assert {m.closes[0] for m in on_goes} == {1001}
        delays = sorted(m.reconnected_at - dropped_at for m in on_goes)
        assert delays[-1] - delays[0] > FIRST_AFTER_GOING_AWAY_SECONDS / 2
        assert delays[-1] < FIRST_AFTER_GOING_AWAY_SECONDS + 5

        # Nothing acknowledged is missed by anyone, live or recovered.
        for member in members:
            await member.until(
                lambda m=member: m.seqs("deploy") >= set(acked), "every acked message"
            )
            joined = next(f for f in member.sockets[0] if f.get("ref") == "join-deploy")
            assert member.seqs("deploy") == set(
                range(joined["last_seq"] + 1, final + 1)
            )
    finally:
        await in_parallel(m.close() for m in members)
