"""No frame, by any slug or message id trick, shows a non-member a private room.

Mallory, a signed-in user who belongs to neither, tries every client frame type
against a private room and a direct conversation between two others, and edits
and deletes their messages by id through a public room she did join. Every
answer is an exact refusal, nothing she receives carries their content, and
nothing of theirs changes.
"""

import json

import pytest
from asgiref.sync import sync_to_async

from chat import services
from chat.models import Message

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async
SECRET = "the secret plan"
BAD_SLUG = (
    "{frame}: Expected `str` matching regex '^[-a-zA-Z0-9_]{{1,64}}$' - at `$.room`"
)
WHISPER = "a private word"


def error(code, message, ref):
    return {"type": "error", "code": code, "message": message, "ref": ref}


@pytest.fixture
async def rooms(alice, bob, make_user, lobby):
    """A private room of alice's and alice's DM with bob, a message in each."""
    secret = await adb(services.room_create)(
        slug="secret", title="Secret", is_private=True, creator=alice
    )
    plan, _ = await adb(services.message_create)(
        room=secret, author=alice, body=SECRET, client_msg_id="s1"
    )
    whisper, _ = await adb(services.direct_message_create)(
        author=alice, to_username="bob", body=WHISPER, client_msg_id="d1"
    )
    return {"secret": plan, "direct": whisper}


async def test_every_frame_against_a_private_and_a_direct_room_is_refused(
    connect, make_user, rooms
):
    mallory = await connect(await adb(make_user)("mallory"))
    secret_id = rooms["secret"].pk
    direct = rooms["direct"]
    dm_slug = await adb(lambda: direct.room.slug)()
    assert (await mallory.join("lobby", ref="in"))["type"] == "joined"

    attempts = []
    for slug in ("secret", dm_slug):
        private = f"room {slug!r} is private"
        not_joined = f"join room {slug!r} first"
        attempts += [
            ({"type": "join", "room": slug}, "forbidden", private),
            ({"type": "join", "room": slug, "since": 0}, "forbidden", private),
            ({"type": "history", "room": slug}, "forbidden", private),
            ({"type": "history", "room": slug, "before": 2}, "forbidden", private),
            ({"type": "leave", "room": slug}, "not_joined", not_joined),
            (
                {"type": "send", "room": slug, "body": "hi", "client_msg_id": "m"},
                "not_joined",
                not_joined,
            ),
            ({"type": "typing", "room": slug}, "not_joined", not_joined),
            ({"type": "read", "room": slug, "seq": 1}, "not_joined", not_joined),
            (
                {"type": "edit", "room": slug, "id": secret_id, "body": "x"},
                "not_joined",
                not_joined,
            ),
            (
                {"type": "delete", "room": slug, "id": direct.pk},
                "not_joined",
                not_joined,
            ),
        ]
    # Slug tricks: another case, padding, a lookalike letter, a path.
    attempts += [
        ({"type": "join", "room": "SECRET"}, "not_found", "no room 'SECRET'"),
        ({"type": "history", "room": "Secret"}, "not_found", "no room 'Secret'"),
        (
            {"type": "join", "room": "secret "},
            "bad_request",
            BAD_SLUG.format(frame="join"),
        ),
        (
            {"type": "join", "room": "s\u0435cret"},  # a Cyrillic e
            "bad_request",
            BAD_SLUG.format(frame="join"),
        ),
        (
            {"type": "history", "room": "../secret"},
            "bad_request",
            BAD_SLUG.format(frame="history"),
        ),
    ]
    # Through the public room she joined, by the other rooms' message ids.
    for message in (rooms["secret"], direct):
        attempts += [
            (
                {"type": "edit", "room": "lobby", "id": message.pk, "body": "mine"},
                "not_found",
                f"no message {message.pk} in room 'lobby'",
            ),
            (
                {"type": "delete", "room": "lobby", "id": message.pk},
                "not_found",
                f"no message {message.pk} in room 'lobby'",
            ),
        ]

    received = []
    for n, (frame, code, message) in enumerate(attempts):
        ref = f"t{n}"
        reply = await mallory.request(**frame, ref=ref)
        received.append(reply)
        assert reply == error(code, message, ref), frame
    assert await mallory.nothing()

    seen = json.dumps(received)
    assert SECRET not in seen and WHISPER not in seen
    bodies = await adb(
        lambda: sorted(Message.objects.values_list("body", "edited_at", "deleted_at"))
    )()
    assert bodies == [(WHISPER, None, None), (SECRET, None, None)]


async def test_a_dm_to_someone_opens_only_her_own_conversation(
    connect, make_user, rooms
):
    mallory_user = await adb(make_user)("mallory")
    mallory = await connect(mallory_user)
    await mallory.send(type="dm", to="alice", body="hello", client_msg_id="c", ref="d")
    frames = [await mallory.recv(), await mallory.recv()]
    assert sorted(frame["type"] for frame in frames) == ["ack", "message"]
    room = {frame["room"] for frame in frames}
    dm_slug = await adb(lambda: rooms["direct"].room.slug)()
    assert room != {dm_slug}
    history = await mallory.request(type="history", room=room.pop(), ref="h")
    assert [m["body"] for m in history["messages"]] == ["hello"]
