"""Reads: the connect path's plain-SQL reads agree with the models' rules."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from chat import selectors, services
from chat.models import ApiToken, Ban
from chat.protocol import ChatError

pytestmark = pytest.mark.django_db


def test_a_token_never_used_is_found_with_a_stale_use(make_user):
    alice = make_user("alice")
    token, key = services.api_token_create(user=alice)
    found = selectors.token_user_get(key=key)
    assert found == selectors.TokenUser(alice, token.pk, True)


def test_a_token_used_within_its_resolution_is_not_stale(make_user):
    alice = make_user("alice")
    token, key = services.api_token_create(user=alice)
    services.api_token_use_note(token_id=token.pk)
    assert selectors.token_user_get(key=key).use_stale is False
    earlier = timezone.now() - ApiToken.USE_RESOLUTION - timedelta(seconds=1)
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=earlier)
    assert selectors.token_user_get(key=key).use_stale is True


def test_reading_a_token_writes_nothing(make_user):
    alice = make_user("alice")
    token, key = services.api_token_create(user=alice)
    selectors.token_user_get(key=key)
    assert ApiToken.objects.get(pk=token.pk).last_used_at is None


@pytest.mark.parametrize(
    ("expires_in", "in_force"),
    [(None, True), (timedelta(hours=1), True), (timedelta(hours=-1), False)],
)
def test_a_site_ban_keeps_tokens_out_exactly_while_it_is_in_force(
    make_user, expires_in, in_force
):
    alice = make_user("alice")
    _, key = services.api_token_create(user=alice)
    expires_at = timezone.now() + expires_in if expires_in else None
    ban = services.user_ban(user=alice, reason="spam", expires_at=expires_at)
    assert ban.is_active is in_force
    assert list(Ban.objects.active()) == ([ban] if in_force else [])
    assert selectors.user_is_site_banned(user_id=alice.pk) is in_force
    assert selectors.user_get_by_token(key=key) == (None if in_force else alice)


def test_a_room_ban_in_force_refuses_the_room_and_an_expired_one_does_not(make_user):
    alice = make_user("alice")
    lobby = services.room_create(slug="lobby", title="The Lobby")
    ban = services.room_ban(user=alice, room=lobby, reason="flood")
    with pytest.raises(ChatError) as excinfo:
        selectors.room_access_get(slug="lobby", user=alice)
    assert (excinfo.value.code, excinfo.value.message) == (
        "forbidden",
        "you are banned from 'lobby': flood",
    )
    Ban.objects.filter(pk=ban.pk).update(expires_at=timezone.now() - timedelta(1))
    room, read_seq = selectors.room_access_get(slug="lobby", user=alice)
    assert (room.slug, read_seq) == ("lobby", None)


def test_chat_push_refuses_an_inactive_user(make_user):
    make_user("carol", is_active=False)
    with pytest.raises(CommandError, match=r"^No user named 'carol'\.$"):
        call_command("chat_push", "--user", "carol", "e", "{}", stdout=StringIO())


def test_a_rejoin_with_since_replays_a_rooms_missed_messages_in_one_query(
    make_user, django_assert_num_queries
):
    alice, bob = make_user("alice"), make_user("bob")
    room = services.room_create(slug="lobby", title="Lobby")
    for n in range(1, 8):
        services.message_create(
            room=room,
            author=alice if n % 2 else bob,
            body=f"m{n}",
            client_msg_id=f"c{n}",
        )
    room.refresh_from_db()

    with django_assert_num_queries(1):
        payloads, complete = selectors.messages_since(room=room, since=3)

    assert complete is True
    assert [(p.seq, p.body, p.user.username) for p in payloads] == [
        (4, "m4", "bob"),
        (5, "m5", "alice"),
        (6, "m6", "bob"),
        (7, "m7", "alice"),
    ]


def test_a_rejoin_with_since_and_more_missed_than_recovered_is_one_query_too(
    make_user, django_assert_num_queries, monkeypatch
):
    from chat import protocol

    monkeypatch.setattr(protocol, "RECOVERY_MAX_MESSAGES", 3)
    alice = make_user("alice")
    room = services.room_create(slug="lobby", title="Lobby")
    for n in range(1, 8):
        services.message_create(
            room=room, author=alice, body=f"m{n}", client_msg_id=f"c{n}"
        )

    with django_assert_num_queries(1):
        payloads, complete = selectors.messages_since(room=room, since=0)

    assert complete is False
    assert [p.seq for p in payloads] == [5, 6, 7]
