"""Presence in Redis as two processes share it, on a redis-server of the test's own.

Each ``RedisPresence`` stands for one server process; a process that "dies"
simply stops calling its store.
"""

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from channels.layers import get_channel_layer

from chat import presence
from chat.presence import RedisPresence
from tests.servers import RedisServer
from tests.waiting import until

pytestmark = pytest.mark.redis

HEARTBEAT = 0.5  # seconds; short, so a test can outwait it
ROOM = 7


async def first_report(store, what):
    """The first non-empty sweep of ``store``, and the store's clock at the time.

    Staleness is what is under test: the report must come within a few heartbeats,
    and the caller checks it came no sooner than one.
    """
    gone = await until(store.sweep, bool, timeout=10 * HEARTBEAT, what=what)
    return gone, time.time()


@pytest.fixture(scope="module")
def redis_url():
    server = RedisServer().start()
    yield server.url
    server.stop()


@pytest.fixture
async def stores(redis_url):
    """Process X and process Y, on an empty Redis."""
    x = RedisPresence(redis_url, "presence-test", HEARTBEAT)
    y = RedisPresence(redis_url, "presence-test", HEARTBEAT)
    await x.redis.flushdb()
    yield x, y
    await x.close()
    await y.close()


async def test_a_leaving_entry_is_out_of_the_online_list_at_once(stores):
    x, y = stores
    assert await x.enter(ROOM, "c1", 1, "alice") == (True, 1)
    bob_entered = time.time()  # the store scores entries by this clock
    assert await y.enter(ROOM, "c2", 2, "bob") == (True, 2)
    assert await y.online(ROOM, 100) == (["alice", "bob"], 2)

    assert (await x.exit_begin(ROOM, "c1", 1, "alice"))[:2] == (True, 1)
    assert await y.online(ROOM, 100) == (["bob"], 1)
    assert await y.socket_count(ROOM) == 1
    # A fresh leaving entry is its own process's to report, not the sweep's.
    assert await y.sweep() == []

    await x.exit_end(ROOM, "c1", 1, "alice")
    # Nobody vouches for bob: a heartbeat after his entry, the sweep reports him.
    gone, reported = await first_report(y, "bob never reported offline")
    assert gone == [(ROOM, "bob")]
    assert reported - bob_entered > HEARTBEAT
    assert await y.online(ROOM, 100) == ([], 0)


async def test_a_process_killed_while_its_user_leaves_still_reports_them_offline(
    stores,
):
    x, y = stores
    await x.enter(ROOM, "c1", 1, "alice")
    # X marks alice's socket as leaving, then dies before publishing "offline"
    # and before removing the entry.
    began_leaving = time.time()  # the store scores entries by this clock
    assert (await x.exit_begin(ROOM, "c1", 1, "alice"))[:2] == (True, 0)
    assert await y.sweep() == []

    # Left leaving for a heartbeat, the entry is the sweep's to report.
    gone, reported = await first_report(y, "alice never reported offline")
    assert gone == [(ROOM, "alice")]
    assert reported - began_leaving > HEARTBEAT
    assert await y.sweep() == []  # reported once
    assert await y.online(ROOM, 100) == ([], 0)


async def test_leaving_one_of_two_sockets_is_not_the_last(stores):
    x, y = stores
    assert await x.enter(ROOM, "c1", 1, "alice") == (True, 1)
    assert await y.enter(ROOM, "c2", 1, "alice") == (False, 1)
    assert (await x.exit_begin(ROOM, "c1", 1, "alice"))[:2] == (False, 1)
    await x.exit_end(ROOM, "c1", 1, "alice")
    assert await y.online(ROOM, 100) == (["alice"], 1)
    assert (await y.exit_begin(ROOM, "c2", 1, "alice"))[:2] == (True, 0)
    # Leaving twice (a retry) reports nothing the second time.
    assert (await y.exit_begin(ROOM, "c2", 1, "alice"))[:2] == (False, 0)
    await y.exit_end(ROOM, "c2", 1, "alice")
    assert await x.online(ROOM, 100) == ([], 0)


async def _no_groups_to_restore():
    return None


@pytest.mark.django_db(transaction=True)
async def test_the_keeper_reports_the_user_of_a_dead_process_through_the_layer(
    stores, monkeypatch, lobby
):
    x, y = stores
    layer = get_channel_layer()
    channel = await layer.new_channel("test.")
    group = f"room.{lobby.pk}"
    await layer.group_add(group, channel)
    await x.enter(lobby.pk, "c1", 1, "alice")  # then X dies, never leaving
    # Y's keeper, with no sockets of its own.
    monkeypatch.setattr(presence, "get_store", lambda: y)
    hub = SimpleNamespace(
        connections=set(),
        layer=layer,
        groups_refreshed_at=time.monotonic(),
        refresh_subscriptions=_no_groups_to_restore,
    )

    deadline = time.monotonic() + 10 * HEARTBEAT
    event = None
    while event is None:
        assert time.monotonic() < deadline, "alice never reported offline"
        await presence.keep_once(hub)
        try:
            event = await asyncio.wait_for(layer.receive(channel), HEARTBEAT / 5)
        except TimeoutError:
            pass

    frame = {"type": "presence", "room": "lobby", "user": "alice", "status": "offline"}
    assert {**event, "text": json.loads(event["text"])} == {
        "type": "hub.frame",
        "frame_type": "presence",
        "text": frame,
        "exclude_user": None,
        "match": None,
        "group": group,
    }
    await presence.keep_once(hub)
    await layer.send(channel, {"type": "test.marker"})
    # Reported once: the next sweep finds nothing more.
    assert await layer.receive(channel) == {"type": "test.marker"}


async def test_leaving_twice_in_memory_reports_the_user_offline_once():
    store = presence.MemoryPresence()
    assert await store.enter(1, "p-1", 7, "alice") == (True, 1)
    assert (await store.exit_begin(1, "p-1", 7, "alice"))[:2] == (True, 0)
    assert (await store.exit_begin(1, "p-1", 7, "alice"))[:2] == (False, 0)
    assert await store.online(1, 100) == ([], 0)


# --- big rooms: counts without reading entries, batches ---------------------------


async def test_a_room_counts_its_users_not_their_sockets(stores):
    x, y = stores
    for n in range(150):
        assert await (x if n % 2 else y).enter(ROOM, f"c{n}", n, f"u{n:03}") == (
            True,
            n + 1,
        )
    assert await y.enter(ROOM, "c-second", 3, "u003") == (False, 150)
    names, count = await x.online(ROOM, 100)
    assert count == 150
    assert len(names) == 100 and names == sorted(names)
    assert set(names) <= {f"u{n:03}" for n in range(150)}
    assert await y.online_count(ROOM) == 150
    assert (await x.exit_begin(ROOM, "c3", 3, "u003"))[:2] == (False, 150)
    assert (await y.exit_begin(ROOM, "c-second", 3, "u003"))[:2] == (True, 149)


async def test_the_memory_store_lists_the_first_100_names_and_counts_all():
    store = presence.MemoryPresence()
    for n in range(150):
        await store.enter(ROOM, f"c{n}", n, f"u{n:03}")
    assert await store.online(ROOM, 100) == ([f"u{n:03}" for n in range(100)], 150)


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_one_process_sends_a_rooms_next_batch_whoever_adds_to_it(stores, kind):
    x, y = stores if kind == "redis" else (presence.MemoryPresence(),) * 2
    await x.enter(ROOM, "c1", 1, "alice")
    assert await x.batch_add(ROOM, "alice", "online") is True  # x sends it
    assert await y.batch_add(ROOM, "bob", "online") is False
    assert await y.batch_add(ROOM, "bob", "offline") is False  # the last one holds
    assert await x.batch_take(ROOM) == ({"alice": "online", "bob": "offline"}, 1)
    assert await y.batch_take(ROOM) == ({}, 1)
    assert await y.batch_add(ROOM, "carol", "online") is True  # the next one


# --- presence versions: a joined socket skips the changes its joined had ---------


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_the_presence_version_moves_on_with_each_change_only(stores, kind):
    x, y = stores if kind == "redis" else (presence.MemoryPresence(),) * 2
    kw = {"rooms": None, "limit": 100}
    first, names, count, v1 = await x.join(ROOM, "c1", 1, "alice", **kw)
    assert (first, names, count) == (True, ["alice"], 1)
    # A second socket of alice changes nothing: same version.
    assert await y.join(ROOM, "c2", 1, "alice", **kw) == (False, ["alice"], 1, v1)
    first, names, count, v2 = await y.join(ROOM, "c3", 2, "bob", **kw)
    assert (first, names, count) == (True, ["alice", "bob"], 2)
    assert v2 > v1
    # Leaving: not alice's last socket, same version; her last, a newer one.
    assert await x.exit_begin(ROOM, "c1", 1, "alice") == (False, 2, v2)
    last, count, v3 = await y.exit_begin(ROOM, "c2", 1, "alice")
    assert (last, count) == (True, 1)
    assert v3 > v2


async def test_the_presence_version_grows_past_a_redis_that_lost_its_data(stores):
    x, _ = stores
    kw = {"rooms": None, "limit": 100}
    *_, before = await x.join(ROOM, "c1", 1, "alice", **kw)
    await x.redis.flushall()
    *_, after = await x.join(ROOM, "c2", 2, "bob", **kw)
    assert after > before
