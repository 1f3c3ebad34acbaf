"""The services that store nothing (typing, device replacement, presence, push):
the exact events they put on the channel layer, read from the real in-memory
layer by a test channel in the target groups.

They write nothing, so they have no transaction to roll back: the rollback case
of ``tests/test_services.py`` does not apply to them.
"""

import asyncio
import json
import time

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from chat import fanout, presence, registry, services
from tests.test_services import message_frame

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async

RECEIVE_TIMEOUT = 3  # seconds; a deadline, not a pause
MARKER = {"type": "test.marker"}


class Listener:
    """A channel of the test's own in some layer groups."""

    def __init__(self, layer, channel):
        self.layer = layer
        self.channel = channel

    async def join(self, *groups):
        for group in groups:
            await self.layer.group_add(group, self.channel)

    async def next(self):
        """The next event on the channel, its frame text decoded."""
        event = await asyncio.wait_for(
            self.layer.receive(self.channel), RECEIVE_TIMEOUT
        )
        if "text" in event:
            event = {**event, "text": json.loads(event["text"])}
        return event

    async def nothing_more(self):
        """True when nothing came before a marker sent after the fact."""
        await self.layer.send(self.channel, MARKER)
        return await self.next() == MARKER


@pytest.fixture
async def listener():
    layer = get_channel_layer()
    return Listener(layer, await layer.new_channel("test."))


def frame_event(group, frame, *, exclude_user=None, match=None):
    return {
        "type": "hub.frame",
        "frame_type": frame["type"],
        "text": frame,
        "exclude_user": exclude_user,
        "match": match,
        "group": group,
    }


def order_event(group, order, *, match=None):
    return {"type": "hub.frame", "control": order, "match": match, "group": group}


def presence_frame(status, *, user="alice", room="lobby"):
    return {"type": "presence", "room": room, "user": user, "status": status}


async def test_typing_send_tells_the_room_but_the_typist(listener, alice, lobby):
    group = f"room.{lobby.pk}"
    await listener.join(group)

    await services.typing_send(room=lobby, user=alice)

    frame = {"type": "typing", "room": "lobby", "user": "alice"}
    assert await listener.next() == frame_event(group, frame, exclude_user=alice.pk)
    assert await listener.nothing_more()


async def test_typing_in_a_direct_room_reaches_both_users(listener, alice, bob):
    room = await adb(services.direct_room_get_or_create)(user=alice, other=bob)
    groups = [f"user.{alice.pk}", f"user.{bob.pk}"]
    await listener.join(*groups)

    await services.typing_send(room=room, user=bob)

    frame = {"type": "typing", "room": room.slug, "user": "bob"}
    assert [await listener.next(), await listener.next()] == [
        frame_event(group, frame, exclude_user=bob.pk) for group in groups
    ]
    assert await listener.nothing_more()


async def test_device_connections_replace_closes_the_older_sockets(listener, alice):
    group = f"user.{alice.pk}"
    await listener.join(group)

    await services.device_connections_replace(
        user_id=alice.pk, device="phone", connection_id="0a1b2c3d-2"
    )

    order = {
        "action": "close",
        "code": 4409,
        "reason": "replaced by a newer connection with the same device key",
    }
    match = {"device": "phone", "not_connection_id": "0a1b2c3d-2"}
    assert await listener.next() == order_event(group, order, match=match)
    assert await listener.nothing_more()


async def test_room_presence_enter_tells_the_room_of_the_first_socket_only(
    listener, alice, lobby
):
    group = f"room.{lobby.pk}"
    await listener.join(group)

    answer = await services.room_presence_enter(
        room=lobby, connection_id="p-1", user=alice
    )
    first = await listener.next()
    again = await services.room_presence_enter(
        room=lobby, connection_id="p-2", user=alice
    )

    # The change's presence version rides with its frame (sockets that joined
    # at it or later skip it); a second socket changes nothing.
    assert answer == (["alice"], 1, 1)
    assert again == (["alice"], 1, 1)
    assert first == {
        **frame_event(group, presence_frame("online"), exclude_user=alice.pk),
        "presence_version": 1,
    }
    assert await listener.nothing_more()
    assert await presence.room_online(lobby) == (["alice"], 1)


async def test_room_presence_exit_tells_the_room_of_the_last_socket_only(
    listener, alice, lobby
):
    for connection_id in ("p-1", "p-2"):
        await services.room_presence_enter(
            room=lobby, connection_id=connection_id, user=alice
        )
    group = f"room.{lobby.pk}"
    await listener.join(group)

    await services.room_presence_exit(room=lobby, connection_id="p-1", user=alice)
    assert await listener.nothing_more()
    await services.room_presence_exit(room=lobby, connection_id="p-2", user=alice)

    assert await listener.next() == {
        **frame_event(group, presence_frame("offline"), exclude_user=alice.pk),
        "presence_version": 2,
    }
    assert await listener.nothing_more()
    assert await presence.room_online(lobby) == ([], 0)


async def test_room_presence_sweep_report_tells_each_room_its_users_went_offline(
    listener, lobby
):
    other = await adb(services.room_create)(slug="other", title="Other")
    groups = [f"room.{lobby.pk}", f"room.{other.pk}"]
    await listener.join(*groups)

    await services.room_presence_sweep_report(
        gone=[(lobby.pk, "alice"), (other.pk + 100, "ghost"), (other.pk, "bob")]
    )

    # A room deleted meanwhile is skipped; the users of a dead process are
    # nobody's own sockets, so nobody is excluded.
    assert [await listener.next(), await listener.next()] == [
        frame_event(groups[0], presence_frame("offline")),
        frame_event(groups[1], presence_frame("offline", user="bob", room="other")),
    ]
    assert await listener.nothing_more()


def push_frame(event, data):
    return {"type": "push", "event": event, "data": data}


async def test_push_to_user_reaches_the_users_group_and_counts(listener, alice):
    await registry.connection_register(
        {"id": "p-1", "user_id": alice.pk, "username": "alice", "connected_at": "t"}
    )
    group = f"user.{alice.pk}"
    await listener.join(group)

    reached = await services.push_to_user(user_id=alice.pk, event="paid", data=[7])

    assert reached == 1
    assert await listener.next() == frame_event(group, push_frame("paid", [7]))
    assert await listener.nothing_more()


async def test_push_to_room_reaches_the_sockets_that_joined_it(listener, alice, lobby):
    await presence.room_enter(room=lobby, connection_id="p-1", user=alice)
    group = f"room.{lobby.pk}"
    await listener.join(group)

    reached = await services.push_to_room(slug="lobby", event="news", data={"n": 1})

    assert reached == 1
    assert await listener.next() == frame_event(
        group, push_frame("news", {"n": 1}), match={"room": "lobby"}
    )
    assert await listener.nothing_more()


async def test_push_to_connection_reaches_its_process_for_that_socket(listener):
    connection_id = f"{fanout.PROCESS_ID}-9"
    group = f"process.{fanout.PROCESS_ID}"
    await listener.join(group)

    reached = await services.push_to_connection(
        connection_id=connection_id, event="hi", data=None
    )

    assert reached == 0
    assert await listener.next() == frame_event(
        group, push_frame("hi", None), match={"connection_id": connection_id}
    )
    assert await listener.nothing_more()


async def test_push_to_everyone_reaches_every_process(listener):
    await listener.join("everyone")

    reached = await services.push_to_everyone(event="maintenance", data={"in": 5})

    assert reached == 0
    assert await listener.next() == frame_event(
        "everyone", push_frame("maintenance", {"in": 5})
    )
    assert await listener.nothing_more()


async def test_a_committed_batch_is_one_layer_message_to_every_process(
    listener, alice, lobby
):
    """The emission of ``message_create_many`` run as it commits, not captured."""
    other = await adb(services.room_create)(slug="other", title="Other")
    await listener.join("everyone")
    requests = [
        services.SendRequest(lobby, alice, "one", "a1"),
        services.SendRequest(other, alice, "two", "a2"),
    ]

    results = await adb(services.message_create_many)(requests=requests)

    one, two = (result[0] for result in results)
    event = await listener.next()
    multi = [
        (group, [(kind, json.loads(text)) for kind, text in batch])
        for group, batch in event.pop("multi")
    ]
    # When it was sent, for chat_delivery_seconds: after the commit, just now.
    sent_at = event.pop("sent_at")
    assert 0 <= time.time() - sent_at < 5
    assert event == {"type": "hub.frame", "group": None}
    assert multi == [
        (
            f"room.{lobby.pk}",
            [("message", message_frame(one, room="lobby", author=alice, body="one"))],
        ),
        (
            f"room.{other.pk}",
            [("message", message_frame(two, room="other", author=alice, body="two"))],
        ),
    ]
    assert await listener.nothing_more()
