"""Writes: seq allocation, idempotency, direct rooms, read markers."""

import threading

import pytest
from django.db import connection, transaction

from chat import services
from chat.models import Membership, Message, Room
from chat.protocol import ChatError


@pytest.fixture
def alice(make_user):
    return make_user("alice")


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
    assert excinfo.value.code == "room_closed"
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
    assert excinfo.value.code == "forbidden"
    assert not Membership.objects.filter(user=alice).exists()


@pytest.mark.django_db
def test_room_create_refuses_direct_room_slugs(alice):
    with pytest.raises(ChatError) as excinfo:
        services.room_create(slug="dm-1-2", title="Sneaky", creator=alice)
    assert excinfo.value.code == "bad_request"
    assert not Room.objects.exists()


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
        r.code if isinstance(r, ChatError) else (r[0].room.slug, r[0].seq, r[1])
        for r in results
    ]
    assert summary == [
        ("lobby", 1, True),
        ("other", 2, True),
        ("lobby", 2, True),
        ("lobby", 1, False),
        "muted",
        "room_closed",
        ("other", 1, False),
    ]
    assert results[3][0].pk == results[0][0].pk
    assert results[6][0].pk == earlier.pk
    last_seqs = dict(Room.objects.values_list("slug", "last_seq"))
    assert last_seqs == {"lobby": 2, "other": 2, "closed": 0}
    assert Message.objects.count() == 4
