"""The fan-out hub holding a joining socket's group (``Hub.hold``/``release``).

A socket that joins listens to the room before its room is read, so that nothing
stored after the read is missed; until the read says it may have them, what
comes for the room is kept for it, not delivered.
"""

import asyncio

from channels.layers import get_channel_layer

from chat import fanout


class Socket:
    """What the hub calls on a socket: it records what it was handed."""

    def __init__(self, user_id):
        self.user_id = user_id
        self.got = []
        self.presence_floors = {}

    def write_now(self, frames):
        return False  # no daphne socket: every frame through deliver

    async def deliver(self, encoded):
        self.got.append(encoded.text)

    async def control(self, order):
        self.got.append(order)

    def matches(self, match):
        return all(getattr(self, key, None) == value for key, value in match.items())


class FastSocket(Socket):
    """A socket the hub can write to at once: it records each write."""

    def __init__(self, user_id):
        super().__init__(user_id)
        self.writes = []

    def write_now(self, frames):
        self.writes.append(frames)
        self.got.append([encoded.text for encoded in frames.frames])
        return True


def frame_event(group, text):
    return {"type": "hub.frame", "group": group, "frame_type": "message", "text": text}


async def until_received(hub, count):
    # The hub receives on its own task; give it the layer messages sent.
    for _ in range(100):
        if hub.layer_received >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the hub got {hub.layer_received} of {count} events")


async def started_hub():
    hub = await fanout.get_hub()
    hub.layer_received = 0
    deliver = hub.deliver

    async def counting(*events):
        await deliver(*events)
        hub.layer_received += len(events)

    hub.deliver = counting
    return hub


async def test_what_comes_while_held_is_delivered_first_in_order_once_kept():
    hub = await started_hub()
    joining, member = Socket(1), Socket(2)
    await hub.add("room.1", member)
    await hub.hold("room.1", joining)
    layer = get_channel_layer()
    await layer.group_send("room.1", frame_event("room.1", "m1"))
    await layer.group_send("room.1", frame_event("room.1", "m2"))
    await until_received(hub, 2)
    assert joining.got == []

    await hub.release("room.1", joining, keep=True)
    await layer.group_send("room.1", frame_event("room.1", "m3"))
    await until_received(hub, 3)

    assert joining.got == ["m1", "m2", "m3"]
    assert member.got == ["m1", "m2", "m3"]
    assert hub.holding == {}


async def test_what_comes_while_held_is_dropped_when_the_join_is_refused():
    hub = await started_hub()
    joining = Socket(1)
    await hub.hold("room.1", joining)
    layer = get_channel_layer()
    await layer.group_send("room.1", frame_event("room.1", "private"))
    await until_received(hub, 1)

    await hub.release("room.1", joining, keep=False)

    assert joining.got == []
    assert hub.holding == {} and "room.1" not in hub.members
    # Nobody here wants the room any more: the hub stopped listening to it.
    assert "room.1" not in hub._subscribed
    await layer.group_send("room.1", frame_event("room.1", "later"))
    await asyncio.sleep(0.2)
    assert hub.layer_received == 1 and joining.got == []


async def test_a_held_socket_gets_orders_and_batches_of_its_group_only():
    hub = await started_hub()
    joining = Socket(1)
    await hub.hold("room.1", joining)
    layer = get_channel_layer()
    order = {"action": "remove", "room": "lobby", "reason": "banned"}
    await layer.group_send(
        "room.1",
        {"type": "hub.frame", "group": "room.1", "control": order, "match": None},
    )
    multi = [("room.1", [("message", "b1")]), ("room.2", [("message", "other")])]
    await layer.group_send(
        fanout.EVERYONE_GROUP, {"type": "hub.frame", "group": None, "multi": multi}
    )
    await until_received(hub, 1)
    # The multi event goes to "everyone": this hub has no socket there.
    await hub.add(fanout.EVERYONE_GROUP, Socket(9))
    await layer.group_send(
        fanout.EVERYONE_GROUP, {"type": "hub.frame", "group": None, "multi": multi}
    )
    await until_received(hub, 2)

    await hub.release("room.1", joining, keep=True)

    assert joining.got == [order, "b1"]


async def test_exclude_user_applies_to_what_was_held():
    hub = await started_hub()
    joining = Socket(7)
    await hub.hold("room.1", joining)
    event = {**frame_event("room.1", "own presence"), "exclude_user": 7}
    await get_channel_layer().group_send("room.1", event)
    await until_received(hub, 1)

    await hub.release("room.1", joining, keep=True)

    assert joining.got == []


async def test_the_upkeep_re_adds_the_groups_only_when_due():
    hub = await started_hub()
    await hub.add("room.1", Socket(1))
    layer = get_channel_layer()
    # The in-memory layer keeps a group's channels with the time they joined.
    joined_at = layer.groups["room.1"][hub.channel_name]

    await fanout.groups_upkeep(hub)
    assert layer.groups["room.1"][hub.channel_name] == joined_at

    hub.groups_refreshed_at -= fanout.GROUPS_REFRESH_SECONDS
    await fanout.groups_upkeep(hub)
    assert layer.groups["room.1"][hub.channel_name] > joined_at


async def test_what_a_socket_gets_from_many_events_is_one_write_shared_by_the_room():
    hub = await fanout.get_hub()
    alice, bob, carol = FastSocket(1), FastSocket(2), FastSocket(3)
    await hub.add("room.1", alice)
    await hub.add("room.1", bob)
    await hub.add("room.2", carol)
    await hub.deliver(
        frame_event("room.1", "m1"),
        frame_event("room.2", "n1"),
        {**frame_event("room.1", "m2"), "exclude_user": 2},
        frame_event("room.1", "m3"),
    )
    assert alice.got == [["m1", "m2", "m3"]]
    assert bob.got == [["m1", "m3"]]
    assert carol.got == [["n1"]]
    # Sockets with the same frames share one Frames: bytes joined once.
    await hub.deliver(frame_event("room.1", "m4"), frame_event("room.1", "m5"))
    assert alice.writes[-1] is bob.writes[-1]
    assert alice.got[-1] == ["m4", "m5"]


async def test_an_order_among_events_comes_after_the_frames_before_it():
    hub = await fanout.get_hub()
    alice = FastSocket(1)
    await hub.add("room.1", alice)
    order = {"action": "remove", "room": "r", "reason": "kicked"}
    await hub.deliver(
        frame_event("room.1", "m1"),
        {"type": "hub.frame", "group": "room.1", "control": order},
        frame_event("room.1", "m2"),
    )
    assert alice.got == [["m1"], order, ["m2"]]


def presence_event(group, text, version):
    return {
        "type": "hub.frame",
        "group": group,
        "frame_type": "presence",
        "text": text,
        "presence_version": version,
    }


async def test_a_socket_skips_presence_changes_its_joined_frame_had():
    hub = await fanout.get_hub()
    early, late, joining = FastSocket(1), FastSocket(2), Socket(3)
    early.presence_floors = {"room.1": 3}
    late.presence_floors = {"room.1": 5}
    await hub.add("room.1", early)
    await hub.add("room.1", late)
    await hub.hold("room.1", joining)
    await hub.deliver(
        presence_event("room.1", "v4", 4),
        presence_event("room.1", "v5", 5),
        frame_event("room.1", "m1"),
        presence_event("room.1", "v6", 6),
    )
    assert early.got == [["v4", "v5", "m1", "v6"]]
    assert late.got == [["m1", "v6"]]
    # Kept while joining; its joined frame was at version 5.
    joining.presence_floors = {"room.1": 5}
    await hub.release("room.1", joining, keep=True)
    assert joining.got == ["m1", "v6"]
