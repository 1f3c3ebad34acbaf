"""A broadcast lost on its way leaves no silent gap: the client fills it with history.

The messages here are stored through the service layer with their broadcast
dropped, as when a layer message expires or Redis loses it; the next live
message shows the jump in seq to the test client (``Client.follow``), which
fetches the missing range as the room page does.
"""

from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from chat import services
from chat.services import SendRequest
from tests.test_multiprocess import stored_message

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async


@adb
def messages_store_unbroadcast(*, room, author, bodies, prefix="lost"):
    """Store ``bodies`` in one commit whose broadcast never leaves the process."""
    requests = [
        SendRequest(room, author, body, f"{prefix}-{number}")
        for number, body in enumerate(bodies, start=1)
    ]
    with mock.patch.object(services, "_emit") as emit:
        results = services.message_create_many(requests=requests)
    assert emit.call_count == 1  # the broadcast that was lost
    return [message for message, _ in results]


async def watch_and_send(connect, watcher, sender):
    """Open both sockets in the lobby; the watcher follows it from its last seq."""
    watching = await connect(watcher)
    watching.follow(await watching.join("lobby"))
    sending = await connect(sender)
    await sending.join("lobby")
    await watching.recv()  # the sender's presence
    return watching, sending


async def send_live(client, body, client_msg_id):
    await client.send(type="send", room="lobby", body=body, client_msg_id=client_msg_id)


def history_request(before, limit, ref):
    return {
        "type": "history",
        "room": "lobby",
        "before": before,
        "limit": limit,
        "ref": ref,
    }


def seqs_and_bodies(messages):
    return [(m["seq"], m["body"], m["deleted"]) for m in messages]


async def test_a_lost_broadcast_is_fetched_with_history_at_the_next_message(
    connect, alice, bob, lobby
):
    bob_socket, alice_socket = await watch_and_send(connect, bob, alice)
    await messages_store_unbroadcast(room=lobby, author=alice, bodies=["lost"])
    assert await bob_socket.nothing()  # it really never reaches the socket

    await send_live(alice_socket, "live", "live-1")
    messages = await bob_socket.messages_until("lobby", 2)

    assert messages == [
        {k: v for k, v in (await stored_message("lobby", seq)).items() if k != "type"}
        for seq in (1, 2)
    ]
    assert seqs_and_bodies(messages) == [(1, "lost", False), (2, "live", False)]
    assert bob_socket.gap_requests == [history_request(2, 1, "gap-1")]
    assert await bob_socket.nothing()


async def test_a_gap_over_deleted_and_removed_messages_is_fetched_once(
    connect, alice, bob, lobby, make_user
):
    carol = await adb(make_user)("carol")
    bob_socket, alice_socket = await watch_and_send(connect, bob, alice)
    stored = []
    for author, body in [(alice, "one"), (carol, "gone"), (alice, "two")]:
        stored += await messages_store_unbroadcast(
            room=lobby, author=author, bodies=[body], prefix=body
        )
    await adb(services.message_delete)(room=lobby, message_id=stored[2].pk, user=alice)
    # Deleting a user removes their messages: seq 2 is no longer in history at all.
    await adb(get_user_model().objects.filter(pk=carol.pk).delete)()

    await send_live(alice_socket, "live", "live-1")
    messages = await bob_socket.messages_until("lobby", 4)

    assert seqs_and_bodies(messages) == [
        (1, "one", False),
        (3, "", True),
        (4, "live", False),
    ]
    # One page held all that is left of seqs 1 to 3: no second request.
    assert bob_socket.gap_requests == [history_request(4, 3, "gap-1")]
    assert await bob_socket.nothing()


async def test_a_gap_larger_than_a_history_page_is_filled_page_by_page(
    connect, alice, bob, lobby
):
    bob_socket, alice_socket = await watch_and_send(connect, bob, alice)
    bodies = [f"lost {n}" for n in range(1, 151)]
    await messages_store_unbroadcast(room=lobby, author=alice, bodies=bodies)

    await send_live(alice_socket, "live", "live-1")
    messages = await bob_socket.messages_until("lobby", 151)

    assert seqs_and_bodies(messages) == [
        *[(n, f"lost {n}", False) for n in range(1, 151)],
        (151, "live", False),
    ]
    assert bob_socket.gap_requests == [
        history_request(151, 100, "gap-1"),
        history_request(51, 50, "gap-2"),
    ]
    assert await bob_socket.nothing()
