"""Rate limits: per user across sockets and processes, a cheap cap, 1008 for floods."""

import asyncio
import json

import pytest
import redis.asyncio
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from limits import RateLimitItemPerSecond
from limits.aio.strategies import MovingWindowRateLimiter
from websockets.asyncio.client import connect as ws_connect

from chat import throttle
from chat.throttle import Rate, parse_rate
from tests.servers import DaphneServer, RedisServer, this_process_uses_redis

pytestmark = pytest.mark.django_db(transaction=True)
adb = sync_to_async


def test_rates_parse_from_the_setting():
    assert parse_rate("20/10") == Rate(20, 10)
    assert parse_rate(" 5/1 ") == Rate(5, 1)
    assert parse_rate("7") == Rate(7, 1)
    assert parse_rate("0") is None
    assert parse_rate("") is None
    for bad in ("x", "0/10", "5/0", "-1/10", "5/x", "5/10/2"):
        with pytest.raises(ImproperlyConfigured, match="CHAT_RATE_LIMIT"):
            parse_rate(bad)


def history_of(room, ref):
    return {"type": "history", "room": room, "ref": ref}


async def test_a_users_database_frames_past_the_limit_are_rate_limited(
    connect, alice, bob, lobby, settings
):
    settings.CHAT_RATE_LIMIT = "5/10"
    first = await connect(alice)
    second = await connect(alice)
    for i in range(3):
        reply = await first.request(**history_of("lobby", f"a{i}"))
        assert (reply["type"], reply["ref"]) == ("history", f"a{i}")
    for i in range(2):
        reply = await second.request(**history_of("lobby", f"b{i}"))
        assert (reply["type"], reply["ref"]) == ("history", f"b{i}")

    # The sixth of alice's frames in 10 s, whichever socket it comes from.
    refused = await second.request(**history_of("lobby", "b2"))
    # The whole window: when every frame that counted has surely left it.
    assert refused == {
        "type": "error",
        "code": "rate_limited",
        "message": "too many frames: try again in 10 s",
        "retry_after": 10.0,
        "ref": "b2",
    }
    refused = await first.request(
        type="send", room="lobby", body="hi", client_msg_id="c", ref="s"
    )
    assert (refused["code"], refused["ref"]) == ("rate_limited", "s")
    assert await adb(lambda: lobby.messages.count())() == 0
    # Pings have a cap of their own; other users have their own count.
    assert await first.request(type="ping", ref="p") == {"type": "pong", "ref": "p"}
    other = await connect(bob)
    reply = await other.request(**history_of("lobby", "c"))
    assert reply["type"] == "history"


async def test_sends_within_the_limit_are_stored_and_acked(
    connect, alice, lobby, settings
):
    settings.CHAT_RATE_LIMIT = "3/10"
    client = await connect(alice)
    await client.join("lobby")  # one of the three
    for i in range(3):
        await client.send(
            type="send", room="lobby", body=f"m{i}", client_msg_id=f"c{i}", ref=f"r{i}"
        )
    replies = []
    while len(replies) < 3:
        frame = await client.recv()
        if frame["type"] != "message":  # its own messages come back too
            replies.append(frame)
    # The refusal is immediate; the acks follow their commit.
    replies.sort(key=lambda reply: reply["ref"])
    assert [(r["type"], r["ref"]) for r in replies] == [
        ("ack", "r0"),
        ("ack", "r1"),
        ("error", "r2"),
    ]
    assert [r.get("seq") for r in replies[:2]] == [1, 2]
    assert replies[2]["code"] == "rate_limited"
    bodies = await adb(lambda: list(lobby.messages.values_list("body", flat=True)))()
    assert sorted(bodies) == ["m0", "m1"]


async def test_a_socket_that_keeps_sending_through_refusals_is_closed_with_1008(
    connect, alice, lobby, settings
):
    settings.CHAT_RATE_LIMIT = "2/10"
    client = await connect(alice)
    codes = []
    for i in range(2 + throttle.STRIKES_BEFORE_CLOSE):
        reply = await client.request(**history_of("lobby", str(i)))
        codes.append(reply.get("code", reply["type"]))
    assert codes == ["history"] * 2 + ["rate_limited"] * throttle.STRIKES_BEFORE_CLOSE
    assert await client.communicator.receive_output(timeout=2) == {
        "type": "websocket.close",
        "code": 1008,
        "reason": "rate limit: 10 frames refused in a row",
    }
    client.connected = False


async def test_a_frame_let_through_clears_the_strikes(connect, alice, lobby, settings):
    settings.CHAT_RATE_LIMIT = "1/10"
    client = await connect(alice)
    await client.request(**history_of("lobby", "ok"))
    for i in range(throttle.STRIKES_BEFORE_CLOSE - 1):
        reply = await client.request(**history_of("lobby", str(i)))
        assert reply["code"] == "rate_limited"
    # A ping goes through its own cap: the run of refusals is broken.
    assert await client.request(type="ping") == {"type": "pong"}
    for i in range(throttle.STRIKES_BEFORE_CLOSE - 1):
        reply = await client.request(**history_of("lobby", str(i)))
        assert reply["code"] == "rate_limited"
    assert await client.request(type="ping") == {"type": "pong"}


async def test_pings_and_typing_share_a_cheap_cap_per_socket(
    connect, alice, lobby, settings
):
    settings.CHAT_RATE_LIMIT = "0"
    client = await connect(alice)
    await client.join("lobby")
    for i in range(throttle.CHEAP_RATE.count - 1):
        assert await client.request(type="ping", ref=str(i)) == {
            "type": "pong",
            "ref": str(i),
        }
    await client.send(type="typing", room="lobby")  # the 30th
    assert await client.nothing()
    refused = await client.request(type="ping", ref="over")
    assert refused["code"] == "rate_limited"
    assert 9.0 <= refused["retry_after"] <= 10.0
    # Another socket of the same user has a cap of its own.
    other = await connect(alice)
    assert await other.request(type="ping") == {"type": "pong"}


async def test_with_the_limit_off_a_flood_of_database_frames_is_served(
    connect, alice, lobby, settings
):
    settings.CHAT_RATE_LIMIT = "0"
    client = await connect(alice)
    for i in range(150):
        await client.send(**history_of("lobby", str(i)))
    replies = [await client.recv() for _ in range(150)]
    assert [reply["ref"] for reply in replies] == [str(i) for i in range(150)]
    assert {reply["type"] for reply in replies} == {"history"}


# --- Redis: across processes, one round trip per frame ---------------------------


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


async def limit_commands(redis_url, during):
    """The commands clients sent Redis on rate limit keys while ``during()`` runs.

    Not the commands the scripts run inside Redis: round trips only.
    """
    client = redis.asyncio.Redis.from_url(redis_url)
    seen = []
    async with client.monitor() as monitor:

        async def listen():
            async for command in monitor.listen():
                if command["client_type"] != "lua" and ":limits:" in command["command"]:
                    seen.append(command["command"].split()[0].upper())

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.2)
        await during()
        await asyncio.sleep(0.3)
        listener.cancel()
    await client.aclose()
    return seen


def test_a_lease_is_a_tenth_of_the_limit_from_1_to_20():
    limits = (1, 9, 10, 60, 199, 200, 10**6)
    sizes = [throttle.lease_size(Rate(n, 10)) for n in limits]
    assert sizes == [1, 1, 1, 6, 19, 20, 20]


@pytest.mark.redis
async def test_a_lease_lets_its_frames_through_without_asking_redis(redis_server):
    # 60/10: leases of 6. 60 frames take 10 counts; the 61st finds no room
    # for a lease and is refused with the window's length.
    rate = Rate(60, 10)
    with this_process_uses_redis(redis_server.url):
        await throttle.reset()
        await throttle.user_refusal(user_id=2000, rate=rate)  # loads the script

        async def frames():
            answers = [
                await throttle.user_refusal(user_id=2001, rate=rate) for _ in range(61)
            ]
            assert answers == [None] * 60 + [10.0]

        assert await limit_commands(redis_server.url, frames) == ["EVALSHA"] * 11
        # Another process (here: the store, asked directly) sees all 60 taken.
        await throttle.reset()
        assert await throttle.user_refusal(user_id=2001, rate=Rate(60, 10)) == 10.0
        await throttle.reset()


@pytest.mark.redis
async def test_a_lease_that_no_longer_fits_is_refused_whole(redis_server):
    # 60/10 with 57 taken by another process: a lease of 6 does not fit, so
    # the frame is refused although 3 slots are left (at most 5 frames early).
    rate = Rate(60, 10)
    item = RateLimitItemPerSecond(60, 10)
    with this_process_uses_redis(redis_server.url):
        await throttle.reset()
        limiter = MovingWindowRateLimiter(throttle._storage_new())
        assert await limiter.hit(item, "frames", "2002", cost=57) is True
        assert await throttle.user_refusal(user_id=2002, rate=rate) == 10.0
        assert await limiter.hit(item, "frames", "2002", cost=3) is True
        await throttle.reset()


@pytest.mark.redis
async def test_each_counted_frame_costs_one_redis_round_trip(
    connect, alice, bob, lobby, redis_server
):
    # override_settings nested inside: the settings fixture, entered inside
    # this_process_uses_redis, would restore the Redis layer at its teardown.
    with (
        this_process_uses_redis(redis_server.url),
        override_settings(CHAT_RATE_LIMIT="4/10"),
    ):
        # Each script costs a load on its first use in this Redis: bob's frames
        # use both before the count starts.
        warm = await connect(bob)
        for i in range(5):
            await warm.request(**history_of("lobby", str(i)))
        client = await connect(alice)

        async def frames():
            for i in range(4):
                assert (await client.request(**history_of("lobby", str(i))))[
                    "type"
                ] == "history"
            # Refused: the one call to count...
            assert (await client.request(**history_of("lobby", "x")))[
                "code"
            ] == "rate_limited"
            # ...then refused locally until then, and pings never ask Redis.
            assert (await client.request(**history_of("lobby", "y")))[
                "code"
            ] == "rate_limited"
            assert await client.request(type="ping") == {"type": "pong"}

        commands = await limit_commands(redis_server.url, frames)
        assert commands == ["EVALSHA"] * 5
        await client.close()
        client.connected = False
        await throttle.reset()

    with (
        this_process_uses_redis(redis_server.url),
        override_settings(CHAT_RATE_LIMIT="0"),
    ):
        client = await connect(alice)

        async def unmetered():
            for i in range(10):
                await client.request(**history_of("lobby", str(i)))

        assert await limit_commands(redis_server.url, unmetered) == []


@pytest.mark.redis
async def test_the_limit_is_shared_by_a_users_sockets_on_every_process(
    redis_server, alice, lobby, token_for
):
    redis_server.stop()
    redis_server.start()  # empty: no counts left by other tests
    env = {"CHAT_RATE_LIMIT": "5/10"}
    servers = [
        DaphneServer(redis_url=redis_server.url, extra_env=env).start()
        for _ in range(2)
    ]
    try:
        key = await adb(token_for)(alice)
        sockets = [
            await ws_connect(f"{server.ws_url}?token={key}", subprotocols=["chat.v1"])
            for server in servers
        ]
        for socket in sockets:
            json.loads(await socket.recv())  # hello

        async def ask(socket, ref):
            await socket.send(json.dumps(history_of("lobby", ref)))
            return json.loads(await asyncio.wait_for(socket.recv(), 5))

        answers = [await ask(sockets[i % 2], str(i)) for i in range(6)]
        assert [a.get("code", a["type"]) for a in answers] == ["history"] * 5 + [
            "rate_limited"
        ]
        assert answers[5]["ref"] == "5"
        # The first process refuses too, without having seen the refusal.
        assert (await ask(sockets[0], "6"))["code"] == "rate_limited"
        for socket in sockets:
            await socket.close()
    finally:
        for server in servers:
            server.stop()


async def test_frames_go_unmetered_while_the_rate_limit_storage_is_down(
    settings, caplog, monkeypatch
):
    from tests.ports import free_port

    monkeypatch.setattr(throttle, "_last_outage_log", float("-inf"))
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens
    await throttle.reset()
    rate = Rate(1, 10)
    answers = [await throttle.user_refusal(user_id=1, rate=rate) for _ in range(3)]
    assert answers == [None, None, None]
    outage_lines = [r for r in caplog.records if "unmetered" in r.getMessage()]
    assert len(outage_lines) == 1  # once a minute at most
    await throttle.reset()


async def test_a_join_leave_flood_reaches_other_members_only_up_to_the_limit(
    connect, alice, bob, lobby, settings
):
    settings.CHAT_RATE_LIMIT = "10/10"
    watcher = await connect(bob)
    await watcher.join("lobby")
    flooder = await connect(alice)
    codes = []
    for i in range(20):
        frame = {"type": "join" if i % 2 == 0 else "leave", "room": "lobby"}
        reply = await flooder.request(**frame, ref=str(i))
        if reply["type"] == "joined":
            await flooder.nothing(0.05)  # no other frame follows a join here
        codes.append(reply.get("code", reply["type"]))
    assert codes == ["joined", "left"] * 5 + ["rate_limited"] * 10
    presence = [await watcher.recv() for _ in range(10)]
    assert [(p["type"], p["user"], p["status"]) for p in presence] == [
        ("presence", "alice", "online"),
        ("presence", "alice", "offline"),
    ] * 5
    assert await watcher.nothing()
