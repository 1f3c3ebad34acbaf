"""Writes: seq allocation, idempotency, direct rooms, read markers; the exact
events every writing service sends after its commit (none after a rollback); and
the moderation services as live sockets on one process see them.

The events are read from the captured ``on_commit`` callbacks, unexecuted:
``tests/test_services_live.py`` has the services that write nothing. The live
sockets go through the real ASGI application; the services are called as the
admin calls them, and their after-commit effects reach the sockets through this
process's fan-out hub.
"""

import json
import threading
from datetime import UTC, timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.utils import timezone

from chat import fanout, protocol, services
from chat.models import Membership, Message, ModerationAction, Room
from chat.protocol import ChatError
from tests.test_application import browser_headers, session_cookie
from tests.test_consumers import ack_of, closed_with
from tests.test_multiprocess import stored_message

adb = sync_to_async


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


@pytest.fixture
def lobby():
    return services.room_create(slug="lobby", title="Lobby")


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_get_gapless_distinct_seqs(make_user, lobby):
    authors = [make_user(f"user{n}") for n in range(8)]
    errors = []

    def write(author):
        try:
            for n in range(10):
                services.message_create(
                    room=lobby, author=author, body="x", client_msg_id=f"c{n}"
                )
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(a,)) for a in authors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    seqs = sorted(Message.objects.filter(room=lobby).values_list("seq", flat=True))
    assert seqs == list(range(1, 81))
    assert Room.objects.get(pk=lobby.pk).last_seq == 80


@pytest.mark.django_db(transaction=True)
def test_rolled_back_send_leaves_no_gap(alice, lobby):
    with pytest.raises(RuntimeError), transaction.atomic():
        services.message_create(room=lobby, author=alice, body="x", client_msg_id="a")
        raise RuntimeError("the caller's transaction fails")
    message, created = services.message_create(
        room=lobby, author=alice, body="y", client_msg_id="b"
    )
    assert (created, message.seq) == (True, 1)


@pytest.mark.django_db
def test_retry_returns_the_first_message(alice, lobby):
    first, created_first = services.message_create(
        room=lobby, author=alice, body="x", client_msg_id="same"
    )
    again, created_again = services.message_create(
        room=lobby, author=alice, body="other text", client_msg_id="same"
    )
    assert (created_first, created_again) == (True, False)
    assert again.pk == first.pk
    assert again.body == "x"
    assert Room.objects.get(pk=lobby.pk).last_seq == 1


@pytest.mark.django_db
def test_seq_is_per_room(alice, lobby):
    other = services.room_create(slug="other", title="Other")
    services.message_create(room=lobby, author=alice, body="x", client_msg_id="1")
    services.message_create(room=lobby, author=alice, body="x", client_msg_id="2")
    message, _ = services.message_create(
        room=other, author=alice, body="x", client_msg_id="3"
    )
    assert message.seq == 1


@pytest.mark.django_db
def test_closed_room_refuses_new_messages(alice, lobby):
    Room.objects.filter(pk=lobby.pk).update(is_closed=True)
    with pytest.raises(ChatError) as excinfo:
        services.message_create(room=lobby, author=alice, body="x", client_msg_id="1")
    refusal = (excinfo.value.code, excinfo.value.message)
    assert refusal == ("room_closed", "room 'lobby' is closed")
    assert Message.objects.count() == 0
    assert Room.objects.get(pk=lobby.pk).last_seq == 0


@pytest.mark.django_db
def test_direct_room_is_one_per_pair_whoever_starts(alice, make_user):
    bob = make_user("bob")
    first = services.direct_room_get_or_create(user=alice, other=bob)
    second = services.direct_room_get_or_create(user=bob, other=alice)
    assert first.pk == second.pk
    assert first.slug == f"dm-{alice.pk}-{bob.pk}"
    assert (first.is_private, first.is_direct) == (True, True)
    members = set(
        Membership.objects.filter(room=first).values_list("user__username", flat=True)
    )
    assert members == {"alice", "bob"}


@pytest.mark.django_db
def test_room_creator_moderates(alice):
    room = services.room_create(slug="mine", title="Mine", creator=alice)
    assert Membership.objects.get(room=room, user=alice).role == "moderator"


@pytest.mark.django_db
def test_room_join_of_private_room_needs_membership(alice, make_user):
    bob = make_user("bob")
    services.room_create(slug="staff", title="Staff", is_private=True, creator=bob)
    with pytest.raises(ChatError) as excinfo:
        services.room_join(slug="staff", user=alice)
    refusal = (excinfo.value.code, excinfo.value.message)
    assert refusal == ("forbidden", "room 'staff' is private")
    memberships = Membership.objects.values_list("room__slug", "user__username", "role")
    assert list(memberships) == [("staff", "bob", "moderator")]


@pytest.mark.django_db
def test_room_create_refuses_direct_room_slugs(alice):
    with pytest.raises(ChatError) as excinfo:
        services.room_create(slug="dm-1-2", title="Sneaky", creator=alice)
    refusal = (excinfo.value.code, excinfo.value.message)
    assert refusal == (
        "bad_request",
        "Slugs starting with “dm-” are kept for direct conversations.",
    )
    assert Room.objects.count() == 0
    assert Membership.objects.count() == 0


@pytest.mark.django_db
def test_message_create_many_answers_each_request_in_order(alice, make_user, lobby):
    bob = make_user("bob")
    other = services.room_create(slug="other", title="Other")
    closed = services.room_create(slug="closed", title="Closed")
    Room.objects.filter(pk=closed.pk).update(is_closed=True)
    services.user_mute(user=bob, room=lobby, reason="hush")
    earlier, _ = services.message_create(
        room=other, author=alice, body="earlier", client_msg_id="old"
    )
    requests = [
        services.SendRequest(lobby, alice, "one", "a1"),
        services.SendRequest(other, alice, "two", "a2"),
        services.SendRequest(lobby, alice, "three", "a3"),
        services.SendRequest(lobby, alice, "one again", "a1"),
        services.SendRequest(lobby, bob, "muted", "b1"),
        services.SendRequest(closed, alice, "closed", "a4"),
        services.SendRequest(lobby, alice, "retry", "old"),
    ]
    results = services.message_create_many(requests=requests)
    summary = [
        (r.code, r.message)
        if isinstance(r, ChatError)
        else (r[0].room.slug, r[0].seq, r[1])
        for r in results
    ]
    assert summary == [
        ("lobby", 1, True),
        ("other", 2, True),
        ("lobby", 2, True),
        ("lobby", 1, False),
        ("muted", "you are muted in 'lobby': hush"),
        ("room_closed", "room 'closed' is closed"),
        ("other", 1, False),
    ]
    assert results[3][0].pk == results[0][0].pk
    assert results[6][0].pk == earlier.pk
    last_seqs = dict(Room.objects.values_list("slug", "last_seq"))
    assert last_seqs == {"lobby": 2, "other": 2, "closed": 0}
    assert Message.objects.count() == 4


# --- events ----------------------------------------------------------------------


def iso(value):
    """A timestamp as the wire has it: UTC, milliseconds, a Z."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def decoded(frame):
    return json.loads(protocol.encode(frame).text)


def emitted(callbacks):
    """Per captured ``on_commit`` callback, the events it would send, decoded."""
    return [[_event_dict(event) for event in callback.events] for callback in callbacks]


def _event_dict(event):
    if isinstance(event, fanout.Batch):
        return {
            "batch": [
                {"groups": list(groups), "frames": [decoded(f) for f in frames]}
                for groups, frames in event.broadcasts
            ]
        }
    return {
        "groups": list(event.groups),
        "frame": None if event.frame is None else decoded(event.frame),
        "order": event.order,
        "exclude_user": event.exclude_user,
        "match": event.match,
    }


def delivery(groups, *, frame=None, order=None, exclude_user=None, match=None):
    return {
        "groups": groups,
        "frame": frame,
        "order": order,
        "exclude_user": exclude_user,
        "match": match,
    }


def message_frame(message, *, room, author, body):
    return {
        "type": "message",
        "room": room,
        "id": message.pk,
        "seq": message.seq,
        "user": {"id": author.pk, "username": author.username},
        "body": body,
        "created_at": iso(message.created_at),
        "client_msg_id": message.client_msg_id,
        "edited_at": None,
        "deleted": False,
        "mentions": [],
        "reactions": [],
        "reply_to": None,
        "reply_count": 0,
        "attachments": [],
    }


def close_order(reason):
    return {"action": "close", "code": 4403, "reason": reason}


@pytest.mark.django_db
def test_message_create_sends_the_message_to_the_room_after_commit(
    alice, lobby, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        message, _ = services.message_create(
            room=lobby, author=alice, body="hi", client_msg_id="c1"
        )
    assert message.seq == 1
    frame = message_frame(message, room="lobby", author=alice, body="hi")
    assert emitted(callbacks) == [
        [{"batch": [{"groups": [f"room.{lobby.pk}"], "frames": [frame]}]}]
    ]


@pytest.mark.django_db
def test_a_mention_notifies_the_mentioned_after_the_rooms_broadcast(
    alice, bob, lobby, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        message, _ = services.message_create(
            room=lobby, author=alice, body="@bob @alice look", client_msg_id="c1"
        )
    frame = {
        **message_frame(message, room="lobby", author=alice, body="@bob @alice look"),
        "mentions": ["bob", "alice"],
    }
    payload = {k: v for k, v in frame.items() if k != "type"}
    notification = {
        "type": "notification",
        "kind": "mention",
        "room": "lobby",
        "message": payload,
    }
    # Two commits' worth of events, in order: the room's, then bob's (not the
    # author's own mention).
    assert emitted(callbacks) == [
        [{"batch": [{"groups": [f"room.{lobby.pk}"], "frames": [frame]}]}],
        [delivery([f"user.{bob.pk}"], frame=notification)],
    ]


@pytest.mark.django_db
def test_read_marker_set_tells_every_socket_of_the_user_after_commit(
    alice, bob, lobby, django_capture_on_commit_callbacks
):
    services.membership_add(room=lobby, user=bob)
    for n in range(3):
        services.message_create(
            room=lobby, author=alice, body="x", client_msg_id=f"c{n}"
        )
    with django_capture_on_commit_callbacks() as callbacks:
        state, last_seq = services.read_marker_set(room=lobby, user=bob, seq=2)
    assert (state.read_seq, state.unread(last_seq), state.mentions) == (2, 1, 0)
    marker = {
        "type": "read_marker",
        "room": "lobby",
        "seq": 2,
        "unread": 1,
        "mentions": 0,
    }
    assert emitted(callbacks) == [[delivery([f"user.{bob.pk}"], frame=marker)]]


@pytest.mark.django_db
def test_a_reaction_tells_the_room_only_when_it_changes_something(
    alice, bob, lobby, django_capture_on_commit_callbacks
):
    message, _ = services.message_create(
        room=lobby, author=alice, body="x", client_msg_id="c1"
    )
    react = {"room": lobby, "message_id": message.pk, "user": bob, "emoji": "🎉"}
    with django_capture_on_commit_callbacks() as callbacks:
        services.reaction_set(**react)
    reaction = {
        "type": "reaction",
        "room": "lobby",
        "id": message.pk,
        "seq": 1,
        "emoji": "🎉",
        "user": "bob",
        "on": True,
        "count": 1,
    }
    assert emitted(callbacks) == [[delivery([f"room.{lobby.pk}"], frame=reaction)]]
    with django_capture_on_commit_callbacks() as callbacks:
        services.reaction_set(**react)  # the same again: nothing changes
    assert callbacks == []
    with django_capture_on_commit_callbacks() as callbacks:
        services.reaction_set(**react, on=False)
    assert emitted(callbacks) == [
        [delivery([f"room.{lobby.pk}"], frame={**reaction, "on": False, "count": 0})]
    ]
    message.refresh_from_db()
    assert message.reaction_summary == []


@pytest.mark.django_db
def test_a_retried_send_sends_nothing_again(
    alice, lobby, django_capture_on_commit_callbacks
):
    services.message_create(room=lobby, author=alice, body="hi", client_msg_id="c1")
    with django_capture_on_commit_callbacks() as callbacks:
        services.message_create(room=lobby, author=alice, body="hi", client_msg_id="c1")
    assert callbacks == []


@pytest.mark.django_db
def test_message_create_many_sends_every_rooms_frames_as_one_batch(
    alice, bob, lobby, django_capture_on_commit_callbacks
):
    other = services.room_create(slug="other", title="Other")
    services.user_mute(user=bob, room=other, reason="hush")
    requests = [
        services.SendRequest(lobby, alice, "one", "a1"),
        services.SendRequest(other, alice, "two", "a2"),
        services.SendRequest(lobby, bob, "three", "b1"),
        services.SendRequest(other, bob, "muted", "b2"),
    ]
    with django_capture_on_commit_callbacks() as callbacks:
        results = services.message_create_many(requests=requests)
    one, two, three = (result[0] for result in results[:3])
    assert (results[3].code, results[3].message) == (
        "muted",
        "you are muted in 'other': hush",
    )
    assert [(m.room.slug, m.seq) for m in (one, two, three)] == [
        ("lobby", 1),
        ("other", 1),
        ("lobby", 2),
    ]
    assert emitted(callbacks) == [
        [
            {
                "batch": [
                    {
                        "groups": [f"room.{lobby.pk}"],
                        "frames": [
                            message_frame(one, room="lobby", author=alice, body="one"),
                            message_frame(
                                three, room="lobby", author=bob, body="three"
                            ),
                        ],
                    },
                    {
                        "groups": [f"room.{other.pk}"],
                        "frames": [
                            message_frame(two, room="other", author=alice, body="two")
                        ],
                    },
                ]
            }
        ]
    ]


@pytest.mark.django_db
def test_direct_message_create_sends_to_both_users_everywhere(
    alice, bob, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        message, _ = services.direct_message_create(
            author=bob, to_username="alice", body="psst", client_msg_id="d1"
        )
    slug = f"dm-{alice.pk}-{bob.pk}"
    frame = message_frame(message, room=slug, author=bob, body="psst")
    groups = [f"user.{alice.pk}", f"user.{bob.pk}"]
    assert emitted(callbacks) == [[{"batch": [{"groups": groups, "frames": [frame]}]}]]


@pytest.mark.django_db
def test_message_edit_sends_message_edited(
    alice, lobby, django_capture_on_commit_callbacks
):
    message, _ = services.message_create(
        room=lobby, author=alice, body="helo", client_msg_id="c1"
    )
    with django_capture_on_commit_callbacks() as callbacks:
        edited = services.message_edit(
            room=lobby, message_id=message.pk, user=alice, body="hello"
        )
    frame = {
        "type": "message_edited",
        "room": "lobby",
        "id": message.pk,
        "seq": 1,
        "body": "hello",
        "edited_at": iso(edited.edited_at),
        "mentions": [],
    }
    assert emitted(callbacks) == [[delivery([f"room.{lobby.pk}"], frame=frame)]]


@pytest.mark.django_db
def test_message_delete_sends_message_deleted(
    alice, lobby, django_capture_on_commit_callbacks
):
    message, _ = services.message_create(
        room=lobby, author=alice, body="oops", client_msg_id="c1"
    )
    with django_capture_on_commit_callbacks() as callbacks:
        services.message_delete(room=lobby, message_id=message.pk, user=alice)
    frame = {"type": "message_deleted", "room": "lobby", "id": message.pk, "seq": 1}
    assert emitted(callbacks) == [[delivery([f"room.{lobby.pk}"], frame=frame)]]


@pytest.mark.django_db
def test_message_hide_sends_message_deleted_once(
    alice, lobby, django_capture_on_commit_callbacks
):
    message, _ = services.message_create(
        room=lobby, author=alice, body="spam", client_msg_id="c1"
    )
    with django_capture_on_commit_callbacks() as callbacks:
        services.message_hide(message=message, reason="spam")
    frame = {"type": "message_deleted", "room": "lobby", "id": message.pk, "seq": 1}
    assert emitted(callbacks) == [[delivery([f"room.{lobby.pk}"], frame=frame)]]
    with django_capture_on_commit_callbacks() as callbacks:
        services.message_hide(message=message, reason="spam")
    assert callbacks == []


@pytest.mark.django_db
def test_api_token_revoke_closes_the_sockets_opened_with_it(
    alice, django_capture_on_commit_callbacks
):
    token, _ = services.api_token_create(user=alice)
    with django_capture_on_commit_callbacks() as callbacks:
        services.api_token_revoke(token=token)
    order = close_order("token revoked")
    match = {"token_id": token.pk}
    assert emitted(callbacks) == [
        [delivery([f"user.{alice.pk}"], order=order, match=match)]
    ]
    with django_capture_on_commit_callbacks() as callbacks:
        services.api_token_revoke(token=token)
    assert callbacks == []


@pytest.mark.django_db
def test_user_ban_closes_every_socket_of_the_user(
    alice, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        services.user_ban(user=alice, reason="spam")
    order = close_order("banned: spam")
    assert emitted(callbacks) == [[delivery([f"user.{alice.pk}"], order=order)]]


@pytest.mark.django_db
def test_room_ban_takes_the_users_sockets_out_of_the_room(
    alice, lobby, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        services.room_ban(user=alice, room=lobby, reason="spam")
    order = {
        "action": "remove",
        "room": "lobby",
        "reason": "banned from the room: spam",
    }
    assert emitted(callbacks) == [[delivery([f"user.{alice.pk}"], order=order)]]


@pytest.mark.django_db
def test_ban_update_enforces_a_ban_in_force_only(
    alice, django_capture_on_commit_callbacks
):
    ban = services.user_ban(
        user=alice, reason="spam", expires_at=timezone.now() - timedelta(hours=1)
    )
    with django_capture_on_commit_callbacks() as callbacks:
        services.ban_update(ban=ban)
    assert callbacks == []
    ban.expires_at = None
    ban.reason = "more spam"
    with django_capture_on_commit_callbacks() as callbacks:
        services.ban_update(ban=ban)
    order = close_order("banned: more spam")
    assert emitted(callbacks) == [[delivery([f"user.{alice.pk}"], order=order)]]


@pytest.mark.django_db
def test_room_close_takes_every_socket_out_of_the_room(
    lobby, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        services.room_close(room=lobby, reason="done")
    order = {"action": "remove", "room": "lobby", "reason": "room closed: done"}
    match = {"room": "lobby"}
    assert emitted(callbacks) == [
        [delivery([f"room.{lobby.pk}"], order=order, match=match)]
    ]


@pytest.mark.django_db
def test_user_sign_out_everywhere_closes_the_session_sockets(
    alice, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        services.user_sign_out_everywhere(user=alice)
    order = close_order("signed out")
    match = {"auth": "session"}
    assert emitted(callbacks) == [
        [delivery([f"user.{alice.pk}"], order=order, match=match)]
    ]


@pytest.mark.django_db
def test_connection_disconnect_closes_that_socket_on_its_process(
    django_capture_on_commit_callbacks,
):
    with django_capture_on_commit_callbacks() as callbacks:
        services.connection_disconnect(connection_id="0a1b2c3d-7", reason="flood")
    order = close_order("kicked by a moderator: flood")
    match = {"connection_id": "0a1b2c3d-7"}
    assert emitted(callbacks) == [
        [delivery(["process.0a1b2c3d"], order=order, match=match)]
    ]


@pytest.mark.django_db
def test_membership_remove_takes_the_users_sockets_out_of_a_private_room(
    alice, bob, django_capture_on_commit_callbacks
):
    staff = services.room_create(slug="staff", title="Staff", is_private=True)
    membership = services.membership_add(room=staff, user=bob)
    with django_capture_on_commit_callbacks() as callbacks:
        services.membership_remove(membership=membership, actor=alice)
    order = {
        "action": "remove",
        "room": "staff",
        "reason": "you are no longer a member of the room",
    }
    assert emitted(callbacks) == [[delivery([f"user.{bob.pk}"], order=order)]]
    assert (
        list(Membership.objects.filter(room=staff).values_list("user__username")) == []
    )
    assert list(
        ModerationAction.objects.values_list("kind", "actor", "target_user", "room")
    ) == [("membership_remove", alice.pk, bob.pk, staff.pk)]


@pytest.mark.django_db
def test_membership_remove_of_a_public_room_sends_nothing(
    bob, lobby, django_capture_on_commit_callbacks
):
    membership = services.membership_add(room=lobby, user=bob)
    with django_capture_on_commit_callbacks() as callbacks:
        services.membership_remove(membership=membership)
    assert callbacks == []
    assert Membership.objects.filter(room=lobby, user=bob).count() == 0


@pytest.mark.django_db
def test_user_deactivate_closes_every_socket_of_the_user(
    alice, bob, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        services.user_deactivate(user=bob, actor=alice)
    order = close_order("account deactivated")
    assert emitted(callbacks) == [[delivery([f"user.{bob.pk}"], order=order)]]
    bob.refresh_from_db()
    assert bob.is_active is False


@pytest.mark.django_db
def test_session_sign_out_closes_the_sockets_of_that_session(
    bob, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        services.session_sign_out(user_id=bob.pk, session_key="abc123")
    fingerprint = services.session_fingerprint("abc123")
    assert fingerprint == "6ca13d52ca70c883"
    assert emitted(callbacks) == [
        [
            delivery(
                [f"user.{bob.pk}"],
                order=close_order("signed out"),
                match={"session": fingerprint},
            )
        ]
    ]


def _session_sign_out(world):
    services.session_sign_out(user_id=world["bob"].pk, session_key="abc123")


def _membership_remove(world):
    services.membership_remove(membership=world["staff_membership"])


def _deactivate(world):
    services.user_deactivate(user=world["bob"])


def _send(world):
    services.message_create(
        room=world["lobby"], author=world["alice"], body="x", client_msg_id="new"
    )


def _send_many(world):
    requests = [
        services.SendRequest(world["lobby"], world["alice"], "x", "new1"),
        services.SendRequest(world["other"], world["alice"], "y", "new2"),
    ]
    services.message_create_many(requests=requests)


def _direct_message(world):
    services.direct_message_create(
        author=world["alice"], to_username="bob", body="x", client_msg_id="dm"
    )


def _edit(world):
    services.message_edit(
        room=world["lobby"],
        message_id=world["message"].pk,
        user=world["alice"],
        body="new",
    )


def _delete(world):
    services.message_delete(
        room=world["lobby"], message_id=world["message"].pk, user=world["alice"]
    )


def _hide(world):
    services.message_hide(message=world["message"])


def _token_revoke(world):
    services.api_token_revoke(token=world["token"])


def _user_ban(world):
    services.user_ban(user=world["bob"], reason="spam")


def _room_ban(world):
    services.room_ban(user=world["bob"], room=world["lobby"], reason="spam")


def _ban_update(world):
    ban = world["ban"]
    ban.reason = "changed"
    services.ban_update(ban=ban)


def _room_close(world):
    services.room_close(room=world["lobby"])


def _sign_out(world):
    services.user_sign_out_everywhere(user=world["bob"])


def _disconnect(world):
    services.connection_disconnect(connection_id="0a1b2c3d-7")


@pytest.fixture
def world(alice, bob, lobby):
    message, _ = services.message_create(
        room=lobby, author=alice, body="x", client_msg_id="old"
    )
    return {
        "alice": alice,
        "bob": bob,
        "lobby": lobby,
        "other": services.room_create(slug="other", title="Other"),
        "message": message,
        "token": services.api_token_create(user=bob)[0],
        "ban": services.room_ban(user=bob, room=lobby, reason="spam"),
        "staff_membership": services.membership_add(
            room=services.room_create(slug="staff", title="Staff", is_private=True),
            user=bob,
        ),
    }


@pytest.mark.django_db
@pytest.mark.parametrize(
    "action",
    [
        _send,
        _send_many,
        _direct_message,
        _edit,
        _delete,
        _hide,
        _token_revoke,
        _user_ban,
        _room_ban,
        _ban_update,
        _room_close,
        _sign_out,
        _disconnect,
        _membership_remove,
        _deactivate,
        _session_sign_out,
    ],
    ids=lambda action: action.__name__.strip("_"),
)
def test_a_rolled_back_action_sends_nothing(
    world, action, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        with pytest.raises(RuntimeError), transaction.atomic():
            pending = len(connection.run_on_commit)
            action(world)
            # The action registered its one emission; the rollback drops it.
            assert len(connection.run_on_commit) == pending + 1
            raise RuntimeError("the caller's transaction fails")
    assert callbacks == []


async def ack_and_message(socket, **send):
    """Send; return the sender's ack and its copy of the message, in that order."""
    await socket.send(type="send", **send)
    frames = [await socket.recv(), await socket.recv()]
    return sorted(frames, key=lambda frame: frame["type"])


async def assert_stored_and_acked(socket, room, body, msg_id, seq):
    ack, message = await ack_and_message(
        socket, room=room, body=body, client_msg_id=msg_id
    )
    stored = await stored_message(room, seq)
    assert (stored["body"], stored["client_msg_id"]) == (body, msg_id)
    assert message == stored
    assert ack == ack_of(stored)


async def moderation_log():
    """(kind, actor id, target id, room id, reason, detail), oldest first."""
    rows = ModerationAction.objects.order_by("created_at", "pk").values_list(
        "kind", "actor_id", "target_user_id", "room_id", "reason", "detail"
    )
    return await adb(list)(rows)


# --- live sockets: bans, mutes, room close ---------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_site_ban_closes_the_users_sockets_with_4403_and_records_it(
    connect, alice, bob
):
    socket = await connect(bob)

    await adb(services.user_ban)(user=bob, reason="spamming", actor=alice)

    assert await closed_with(socket) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "banned: spamming",
    }
    assert await moderation_log() == [
        ("ban", alice.pk, bob.pk, None, "spamming", "no end")
    ]


@pytest.mark.django_db(transaction=True)
async def test_room_ban_removes_the_user_from_that_room_only(connect, bob, lobby):
    await adb(services.room_create)(slug="other", title="Other")
    socket = await connect(bob)
    await socket.join("lobby")
    await socket.join("other")

    await adb(services.room_ban)(user=bob, room=lobby, reason="rude")

    assert await socket.recv() == {
        "type": "removed",
        "room": "lobby",
        "reason": "banned from the room: rude",
    }
    banned = {
        "type": "error",
        "code": "forbidden",
        "message": "you are banned from 'lobby': rude",
    }
    assert await socket.join("lobby") == banned
    reply = await socket.request(type="send", room="lobby", body="x", client_msg_id="1")
    assert reply == {
        "type": "error",
        "code": "not_joined",
        "message": "join room 'lobby' first",
    }
    assert await socket.request(type="history", room="lobby") == banned
    await assert_stored_and_acked(socket, "other", "still here", "2", seq=1)


@pytest.mark.django_db(transaction=True)
async def test_mute_refuses_sends_until_lifted(connect, bob, lobby):
    socket = await connect(bob)
    await socket.join("lobby")
    mute = await adb(services.user_mute)(user=bob, room=lobby, reason="calm down")
    reply = await socket.request(
        type="send", room="lobby", body="x", client_msg_id="1", ref="m"
    )
    assert reply == {
        "type": "error",
        "code": "muted",
        "message": "you are muted in 'lobby': calm down",
        "ref": "m",
    }

    await adb(services.mute_lift)(mute=mute)

    await assert_stored_and_acked(socket, "lobby", "x", "1", seq=1)


@pytest.mark.django_db(transaction=True)
async def test_expired_mute_does_not_refuse(connect, bob, lobby):
    past = timezone.now() - timedelta(seconds=1)
    await adb(services.user_mute)(user=bob, room=lobby, reason="x", expires_at=past)
    socket = await connect(bob)
    await socket.join("lobby")

    await assert_stored_and_acked(socket, "lobby", "x", "1", seq=1)


@pytest.mark.django_db(transaction=True)
async def test_closing_a_room_removes_sockets_and_refuses_sends(connect, alice, lobby):
    socket = await connect(alice)
    await socket.join("lobby")
    await assert_stored_and_acked(socket, "lobby", "before", "1", seq=1)

    await adb(services.room_close)(room=lobby, actor=alice)

    assert await socket.recv() == {
        "type": "removed",
        "room": "lobby",
        "reason": "room closed",
    }
    assert await socket.join("lobby") == {
        "type": "joined",
        "room": "lobby",
        "title": "Lobby",
        "last_seq": 1,
        "online": ["alice"],
        "online_count": 1,
        "read_seq": 0,
        "unread": 0,  # her own
        "mentions": 0,
        "private": False,
        "direct": False,
        "closed": True,
    }
    reply = await socket.request(type="send", room="lobby", body="x", client_msg_id="2")
    assert reply == {
        "type": "error",
        "code": "room_closed",
        "message": "room 'lobby' is closed",
    }
    history = await socket.request(type="history", room="lobby")
    before = await stored_message("lobby", 1)
    del before["type"]  # history lists the message frames' payloads
    assert history == {
        "type": "history",
        "room": "lobby",
        "messages": [before],
        "has_more": False,
    }

    await adb(services.room_reopen)(room=lobby)

    # The sockets in the room hear it is open again (the room page becomes
    # writable without a reload).
    assert await socket.recv() == {
        "type": "push",
        "event": "room.reopened",
        "data": {"room": "lobby"},
    }
    await assert_stored_and_acked(socket, "lobby", "again", "3", seq=2)


@pytest.mark.django_db(transaction=True)
async def test_room_close_is_recorded(alice, lobby):
    await adb(services.room_close)(room=lobby, actor=alice, reason="done")

    assert await moderation_log() == [
        ("room_close", alice.pk, None, lobby.pk, "done", "")
    ]
    assert (await adb(Room.objects.get)(pk=lobby.pk)).is_closed is True


@pytest.mark.django_db(transaction=True)
async def test_message_hide_tells_the_room(connect, alice, bob, lobby):
    socket = await connect(bob)
    await socket.join("lobby")
    message, _ = await adb(services.message_create)(
        room=lobby, author=bob, body="oops", client_msg_id="1"
    )
    assert await socket.recv() == await stored_message("lobby", 1)

    await adb(services.message_hide)(message=message, actor=alice, reason="spam")

    assert await socket.recv() == {
        "type": "message_deleted",
        "room": "lobby",
        "id": message.pk,
        "seq": 1,
    }


# --- live sockets: tokens and sessions -------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_token_revoke_closes_only_sockets_opened_with_it(connect, bob):
    token, key = await adb(services.api_token_create)(user=bob)
    doomed = await connect(path=f"/ws/?token={key}")
    other = await connect(bob)

    await adb(services.api_token_revoke)(token=token)

    assert await closed_with(doomed) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "token revoked",
    }
    assert await other.request(type="ping") == {"type": "pong"}


@pytest.mark.django_db(transaction=True)
async def test_sign_out_everywhere_closes_session_sockets_only(connect, bob):
    cookie = await session_cookie(bob)
    browser = await connect(path="/ws/", headers=browser_headers(cookie))
    script = await connect(bob)

    ended = await adb(services.user_sign_out_everywhere)(user=bob)

    assert ended == 1
    assert await closed_with(browser) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "signed out",
    }
    assert await script.request(type="ping") == {"type": "pong"}
    again = await connect(path="/ws/", headers=[(b"cookie", cookie)])
    assert again.connected is False


@pytest.mark.django_db(transaction=True)
async def test_ban_recorded_after_the_fact_closes_nothing_until_made_current(
    connect, alice, bob
):
    socket = await connect(bob)
    past = timezone.now() - timedelta(minutes=5)
    ban = await adb(services.user_ban)(
        user=bob, reason="old news", expires_at=past, actor=alice
    )
    assert await socket.request(type="ping") == {"type": "pong"}

    ban.expires_at = None
    await adb(services.ban_update)(ban=ban, actor=alice)

    assert await closed_with(socket) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "banned: old news",
    }
    until = f"until {protocol.timestamp(past)}"
    assert await moderation_log() == [
        ("ban", alice.pk, bob.pk, None, "old news", until),
        ("ban", alice.pk, bob.pk, None, "old news", "changed: no end"),
    ]


@pytest.mark.django_db(transaction=True)
async def test_a_member_removed_from_a_private_room_loses_it_on_the_open_socket(
    connect, alice, bob
):
    staff = await adb(services.room_create)(
        slug="staff", title="Staff", is_private=True, creator=alice
    )
    membership = await adb(services.membership_add)(room=staff, user=bob)
    socket = await connect(bob)
    await socket.join("staff")

    await adb(services.membership_remove)(membership=membership, actor=alice)

    assert await socket.recv() == {
        "type": "removed",
        "room": "staff",
        "reason": "you are no longer a member of the room",
    }
    assert await socket.request(
        type="send", room="staff", body="x", client_msg_id="c", ref="s"
    ) == {
        "type": "error",
        "code": "not_joined",
        "message": "join room 'staff' first",
        "ref": "s",
    }
    private = {
        "type": "error",
        "code": "forbidden",
        "message": "room 'staff' is private",
    }
    assert await socket.request(type="join", room="staff", ref="j") == {
        **private,
        "ref": "j",
    }
    assert await socket.request(type="history", room="staff", ref="h") == {
        **private,
        "ref": "h",
    }
    assert await adb(Message.objects.count)() == 0


@pytest.mark.django_db(transaction=True)
async def test_a_deactivated_user_s_open_sockets_close_with_4403(connect, alice, bob):
    socket = await connect(bob)

    await adb(services.user_deactivate)(user=bob, actor=alice)

    assert await closed_with(socket) == {
        "type": "websocket.close",
        "code": 4403,
        "reason": "account deactivated",
    }
    refused = await connect(bob)
    assert refused.connected is False


@pytest.mark.django_db(transaction=True)
async def test_signing_out_closes_that_sessions_sockets_only(connect, alice):
    from django.test import Client as HttpClient

    tabs = []
    for _ in range(2):
        http = HttpClient()
        await adb(http.force_login)(alice)
        cookie = f"sessionid={http.cookies['sessionid'].value}".encode()
        tabs.append((http, await connect(path="/ws/", headers=browser_headers(cookie))))
    script = await connect(alice)
    (signing_out, closing), (_, staying) = tabs

    response = await adb(signing_out.post)("/accounts/logout/")

    assert (response.status_code, response["Location"]) == (302, "/accounts/login/")
    assert await closed_with(closing, timeout=2) == {  # the bound
        "type": "websocket.close",
        "code": 4403,
        "reason": "signed out",
    }
    for socket in (staying, script):
        assert await socket.request(type="ping", ref="p") == {
            "type": "pong",
            "ref": "p",
        }
