"""chat.client.ChatClient against real daphne processes sharing one Redis.

Both framings and gzip give the same frames; read in order, every frame comes
as it was sent, replies and the close included; a client whose process goes
away comes back to the other, rejoins with ``since`` and misses nothing; a
message sent as its process died is stored once, acknowledged on the next socket.
"""

import asyncio

import pytest
from channels.db import database_sync_to_async

from chat.client import ChatClient, ChatClosed, ChatError, ChatRefused
from chat.models import Message
from tests.test_multiprocess import room_create, user_with_key

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def start_daphne(start_daphne, own_redis):
    """Daphnes on this test's own Redis."""
    return lambda: start_daphne(redis_url=own_redis.url)


@database_sync_to_async
def stored(client_msg_id):
    return list(
        Message.objects.filter(client_msg_id=client_msg_id).values_list("pk", "seq")
    )


@pytest.mark.parametrize(
    ("binary", "compress"), [(False, False), (True, False), (False, True), (True, True)]
)
async def test_every_framing_gives_the_same_frames(start_daphne, binary, compress):
    server = start_daphne()
    alice, key = await user_with_key("alice")
    await room_create("lobby")
    async with ChatClient(
        server.ws_url, token=key, binary=binary, compress=compress
    ) as client:
        assert client.hello["user"] == {"id": alice.pk, "username": "alice"}
        joined = await client.join("lobby")
        assert (joined["type"], joined["online"], joined["last_seq"]) == (
            "joined",
            ["alice"],
            0,
        )
        body = "a long enough body to make the history page compress " * 3
        for n in range(1, 9):
            ack = await client.send_message("lobby", body, client_msg_id=f"m{n}")
            assert (ack["type"], ack["seq"], ack["client_msg_id"]) == (
                "ack",
                n,
                f"m{n}",
            )
            message = await client.next_event("message")
            assert (message["seq"], message["body"]) == (n, body)
        page = await client.request({"type": "history", "room": "lobby"})
        assert page["type"] == "history"
        assert [m["seq"] for m in page["messages"]] == list(range(1, 9))
        assert [m["client_msg_id"] for m in page["messages"]] == [
            f"m{n}" for n in range(1, 9)
        ]
        refused = await client.request({"type": "join", "room": "nowhere"})
        assert (refused["type"], refused["code"]) == ("error", "not_found")
        assert client.unacked == {}
        assert client.frames == []  # kept only with record=True


async def test_read_in_order_every_frame_comes_as_sent_then_the_close(
    start_daphne, chat_client
):
    server = start_daphne()
    _, key = await user_with_key("alice")
    await room_create("lobby")
    with pytest.raises(ChatRefused) as refused:
        await ChatClient(server.ws_url, token="no-such-token").connect()
    assert refused.value.status == 403

    first = await chat_client(server, key, name="first", device="phone")
    await first.send({"type": "join", "room": "lobby", "ref": "j"})
    joined = await first.expect("joined")
    assert (joined["ref"], joined["online"]) == ("j", ["alice"])
    await first.send(
        {"type": "send", "room": "lobby", "body": "hi", "client_msg_id": "m1"}
    )
    two = [await first.next_frame(), await first.next_frame()]
    assert sorted((f["type"], f["seq"]) for f in two) == [("ack", 1), ("message", 1)]
    # A reply matched by ref is also in the order it came; a ref of the
    # caller's own is kept.
    pong = await first.request({"type": "ping"})
    assert pong == {"type": "pong", "ref": "r1"}
    assert await first.next_frame() == pong
    assert await first.request({"type": "ping", "ref": "mine"}) == {
        "type": "pong",
        "ref": "mine",
    }
    assert await first.next_frame() == {"type": "pong", "ref": "mine"}
    await first.nothing(0.3)
    await first.send_raw("{not json")
    error = await first.expect("error")
    assert error["code"] == "bad_request"
    with pytest.raises(ChatError, match="first: expected 'message', got"):
        await first.send({"type": "ping", "ref": "p"})
        await first.expect("message")

    second = ChatClient(server.ws_url, token=key, device="phone", ordered=True)
    await second.connect()
    assert await first.expect_close() == (
        4409,
        "replaced by a newer connection with the same device key",
    )
    with pytest.raises(ChatClosed):
        await first.send({"type": "ping"})
    assert first.closes == [
        (4409, "replaced by a newer connection with the same device key")
    ]
    await first.close()
    with pytest.raises(ChatError, match="no frame within 0.1s"):
        await second.next_frame(0.1)
    await second.close()
    with pytest.raises(ChatClosed) as closed:
        await second.next_frame(0.1)
    assert closed.value.code == 1000


@pytest.mark.parametrize(
    ("binary", "compress", "subprotocol", "page_on_the_wire"),
    [
        (False, False, "chat.v1", str),
        (True, False, "chat.v1.bin", bytes),
        (False, True, "chat.v1", bytes),
    ],
)
async def test_record_keeps_each_frame_as_it_came_beside_its_decoded_form(
    start_daphne, binary, compress, subprotocol, page_on_the_wire
):
    server = start_daphne()
    _, key = await user_with_key("alice")
    await room_create("lobby")
    async with ChatClient(
        server.ws_url,
        token=key,
        binary=binary,
        compress=compress,
        record=True,
        keepalive=0.05,
    ) as client:
        assert client.subprotocol == subprotocol
        await client.join("lobby")
        for n in range(20):
            await client.send_message("lobby", f"message {n} " * 10)
        await client.request({"type": "history", "room": "lobby", "ref": "h"})
        [frames], [wire] = client.frames, client.wire
        assert len(frames) == len(wire) == 2 + 40 + 1  # hello, joined; history
        assert [f["type"] for f in frames[:2]] == ["hello", "joined"]
        assert frames[-1]["ref"] == "h"
        assert len(frames[-1]["messages"]) == 20
        assert type(wire[-1]) is page_on_the_wire
        # No keep-alive pong is recorded, though pings went out every 50 ms.
        assert not [f for f in frames if f["type"] == "pong"]


async def test_a_client_whose_process_goes_away_resumes_on_the_other(start_daphne):
    first, second = start_daphne(), start_daphne()
    _, alice_key = await user_with_key("alice")
    _, bob_key = await user_with_key("bob")
    await room_create("lobby")
    alice = await ChatClient(
        [first.ws_url, second.ws_url], token=alice_key, record=True
    ).connect()
    bob = await ChatClient(second.ws_url, token=bob_key).connect()
    try:
        await alice.join("lobby")
        await bob.join("lobby")
        ack = await bob.send_message("lobby", "before", client_msg_id="b1")
        assert (await alice.next_event("message"))["seq"] == ack["seq"] == 1

        first.stop()  # SIGTERM: alice's socket closes with 1001
        sent = [await bob.send_message("lobby", f"while away {n}") for n in range(3)]
        assert [a["seq"] for a in sent] == [2, 3, 4]
        await asyncio.wait_for(_until_reconnected(alice), 20)
        assert alice.closes[0][0] == 1001
        got = [(await alice.next_event("message"))["seq"] for _ in range(3)]
        assert got == [2, 3, 4]
        assert (await alice.next_event("recovered")) == {
            "type": "recovered",
            "room": "lobby",
            "complete": True,
        }
        # Live again, on the second process.
        await bob.send_message("lobby", "after", client_msg_id="b5")
        message = await alice.next_event("message")
        assert (message["seq"], message["body"]) == (5, "after")
        assert alice.hello["connection_id"] != alice.frames[0][0]["connection_id"]
        # Recorded per socket: the first ended with the 1001, the second lives.
        assert len(alice.frames) == 2
        assert [f["seq"] for f in alice.frames[1] if f["type"] == "message"] == [
            2,
            3,
            4,
            5,
        ]
    finally:
        await alice.close()
        await bob.close()


async def _until_reconnected(client):
    while client.reconnects == 0 or not client.connected.is_set():
        await asyncio.sleep(0.05)


async def test_a_send_cut_off_by_its_process_dying_is_stored_once(start_daphne):
    first, second = start_daphne(), start_daphne()
    _, key = await user_with_key("carol")
    await room_create("lobby")
    carol = await ChatClient([first.ws_url, second.ws_url], token=key).connect()
    try:
        await carol.join("lobby")
        sending = asyncio.ensure_future(
            carol.send_message("lobby", "cut off", client_msg_id="once")
        )
        await asyncio.sleep(0)  # the frame is on its way
        first.kill()
        ack = await asyncio.wait_for(sending, 30)
        # Stored before the kill or after the resend: once either way.
        assert await stored("once") == [(ack["id"], ack["seq"])]
        assert ack["seq"] == 1
        assert carol.unacked == {}
        assert carol.reconnects == 1
    finally:
        await carol.close()
