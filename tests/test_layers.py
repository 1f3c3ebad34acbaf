"""chat.layers: channels-redis' layer with batched group calls, on a real Redis.

It must be channels-redis on the wire: a process with either layer reads what a
process with the other sends, over-capacity channels drop as upstream does, and
old messages still expire.
"""

import asyncio

import pytest
import redis.asyncio as redis
from channels_redis.core import RedisChannelLayer as UpstreamLayer

from chat.layers import RedisChannelLayer
from tests.servers import RedisServer


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def layers(redis_server):
    made = []

    def make(kind, **config):
        layer = kind(hosts=[redis_server.url], prefix="layertest", **config)
        made.append(layer)
        return layer

    yield make
    client = redis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    for layer in made:
        await layer.flush()
        await layer.close_pools()


@pytest.mark.parametrize(
    ("sender_kind", "receiver_kind"),
    [
        (RedisChannelLayer, UpstreamLayer),
        (UpstreamLayer, RedisChannelLayer),
        (RedisChannelLayer, RedisChannelLayer),
    ],
)
async def test_either_layer_reads_what_the_other_sends_to_a_group(
    layers, sender_kind, receiver_kind
):
    sender, receiver = layers(sender_kind), layers(receiver_kind)
    first = await receiver.new_channel("hub.")
    second = await receiver.new_channel("hub.")
    await receiver.group_add("room.1", first)
    await receiver.group_add("room.1", second)
    await receiver.group_add("room.2", second)

    await sender.group_send("room.1", {"type": "hub.frame", "text": "one"})
    await sender.group_send("room.2", {"type": "hub.frame", "text": "two"})

    received = [
        await asyncio.wait_for(receiver.receive(first), 2),
        await asyncio.wait_for(receiver.receive(second), 2),
        await asyncio.wait_for(receiver.receive(second), 2),
    ]
    assert received == [
        {"type": "hub.frame", "text": "one"},
        {"type": "hub.frame", "text": "one"},
        {"type": "hub.frame", "text": "two"},
    ]


async def test_group_add_sets_the_groups_expiry_as_upstream_does(layers, redis_server):
    layer = layers(RedisChannelLayer, group_expiry=1234)
    await layer.group_add("room.9", "hub.abc!def")

    client = redis.Redis.from_url(redis_server.url)
    try:
        key = layer._group_key("room.9")
        assert await client.zrange(key, 0, -1) == [b"hub.abc!def"]
        assert 1230 <= await client.ttl(key) <= 1234
    finally:
        await client.aclose()


async def test_a_channel_over_capacity_drops_the_group_message_as_upstream_does(
    layers,
):
    sender = layers(RedisChannelLayer, capacity=2)
    receiver = layers(UpstreamLayer, capacity=2)
    channel = await receiver.new_channel("hub.")
    await receiver.group_add("room.1", channel)

    for n in range(4):
        await sender.group_send("room.1", {"type": "t", "n": n})

    got = [await asyncio.wait_for(receiver.receive(channel), 2) for _ in range(2)]
    assert got == [{"type": "t", "n": 0}, {"type": "t", "n": 1}]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(receiver.receive(channel), 0.3)


async def test_messages_older_than_the_expiry_are_dropped_on_the_next_send(
    layers, redis_server
):
    layer = layers(RedisChannelLayer, expiry=5)
    channel = await layer.new_channel("hub.")
    await layer.group_add("room.1", channel)
    client = redis.Redis.from_url(redis_server.url)
    try:
        key = layer.prefix + layer.non_local_name(channel)
        # A message left unread long ago, scored as upstream scores them.
        await client.zadd(key, {b"stale message": 1.0})
        await layer.group_send("room.1", {"type": "t", "n": "fresh"})
        assert await client.zcard(key) == 1
    finally:
        await client.aclose()
    assert await asyncio.wait_for(layer.receive(channel), 2) == {
        "type": "t",
        "n": "fresh",
    }


async def test_on_another_channels_redis_version_it_is_upstream(layers, monkeypatch):
    layer = layers(RedisChannelLayer)
    monkeypatch.setattr(RedisChannelLayer, "batched", False)
    channel = await layer.new_channel("hub.")
    await layer.group_add("room.1", channel)
    await layer.group_send("room.1", {"type": "t"})
    assert await asyncio.wait_for(layer.receive(channel), 2) == {"type": "t"}
    assert layer._group_send_scripts == {}


@pytest.mark.parametrize("kind", [RedisChannelLayer, UpstreamLayer])
async def test_a_message_left_in_flight_by_a_dead_receive_comes_again(
    layers, redis_server, kind
):
    layer = layers(kind)
    channel = await layer.new_channel("hub.")
    await layer.send(channel, {"type": "t", "n": 1})
    client = redis.Redis.from_url(redis_server.url)
    try:
        # What a receive cancelled between its pop and its handling leaves.
        key = layer.prefix + layer.non_local_name(channel)
        popped = await client.zpopmin(key)
        await client.zadd(layer._backup_channel_name(key), {popped[0][0]: 1.0})
    finally:
        await client.aclose()
    assert await asyncio.wait_for(layer.receive(channel), 2) == {"type": "t", "n": 1}


async def test_a_receive_waiting_before_the_send_gets_it(layers):
    sender, receiver = layers(UpstreamLayer), layers(RedisChannelLayer)
    channel = await receiver.new_channel("hub.")
    waiting = asyncio.ensure_future(receiver.receive(channel))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await sender.send(channel, {"type": "t", "n": "late"})
    assert await asyncio.wait_for(waiting, 2) == {"type": "t", "n": "late"}


async def test_receive_many_takes_what_waits_in_order_in_one_call(layers):
    sender, receiver = layers(UpstreamLayer), layers(RedisChannelLayer)
    hub = await receiver.new_channel("hub.")
    other = await receiver.new_channel("hub.")
    await receiver.group_add("room.1", hub)
    await receiver.group_add("room.1", other)
    for n in range(5):
        await sender.group_send("room.1", {"type": "t", "n": n})
    got = await asyncio.wait_for(receiver.receive_many(hub, 3), 2)
    assert got == [{"type": "t", "n": 0}, {"type": "t", "n": 1}, {"type": "t", "n": 2}]
    # The other channel of the process had its copies kept for it, as upstream.
    assert await asyncio.wait_for(receiver.receive_many(other, 10), 2) == [
        {"type": "t", "n": 0},
        {"type": "t", "n": 1},
        {"type": "t", "n": 2},
    ]
    rest = await asyncio.wait_for(receiver.receive_many(hub, 10), 2)
    assert rest == [{"type": "t", "n": 3}, {"type": "t", "n": 4}]


async def test_receive_many_waits_for_a_message_when_none_waits(layers):
    sender, receiver = layers(RedisChannelLayer), layers(RedisChannelLayer)
    hub = await receiver.new_channel("hub.")
    waiting = asyncio.ensure_future(receiver.receive_many(hub, 64))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await sender.send(hub, {"type": "t", "n": "late"})
    assert await asyncio.wait_for(waiting, 2) == [{"type": "t", "n": "late"}]


async def test_receive_many_hands_a_message_over_once_and_keeps_a_cancelled_one(
    layers, redis_server
):
    layer = layers(RedisChannelLayer)
    hub = await layer.new_channel("hub.")
    await layer.send(hub, {"type": "t", "n": 1})
    assert await asyncio.wait_for(layer.receive_many(hub, 64), 2) == [
        {"type": "t", "n": 1}
    ]
    client = redis.Redis.from_url(redis_server.url)
    key = layer.prefix + layer.non_local_name(hub)
    backup = layer._backup_channel_name(key)
    try:
        await layer.send(hub, {"type": "t", "n": 2})
        # Handed over: the next receive drops it from the backup, not again.
        assert await asyncio.wait_for(layer.receive_many(hub, 64), 2) == [
            {"type": "t", "n": 2}
        ]
        # What a receive cancelled after its pop leaves in the backup comes again.
        await layer.send(hub, {"type": "t", "n": 3})
        popped = await client.zpopmin(key)
        await client.delete(backup)
        await client.zadd(backup, {popped[0][0]: 1.0})
        layer._handed_over.clear()
        assert await asyncio.wait_for(layer.receive_many(hub, 64), 2) == [
            {"type": "t", "n": 3}
        ]
        assert await client.zcard(backup) == 1  # until the next receive drops it
    finally:
        await client.aclose()


async def test_receive_many_on_another_channels_redis_version_is_one_receive(
    layers, monkeypatch
):
    layer = layers(RedisChannelLayer)
    monkeypatch.setattr(RedisChannelLayer, "batched", False)
    hub = await layer.new_channel("hub.")
    await layer.send(hub, {"type": "t", "n": 1})
    await layer.send(hub, {"type": "t", "n": 2})
    assert await asyncio.wait_for(layer.receive_many(hub, 64), 2) == [
        {"type": "t", "n": 1}
    ]
