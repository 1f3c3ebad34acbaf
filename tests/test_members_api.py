"""GET /api/rooms/<slug>/members: the room page's @mention autocomplete."""

import pytest
from pytest_django.asserts import assertRedirects

from chat import services

pytestmark = pytest.mark.django_db


@pytest.fixture
def users(make_user):
    return {name: make_user(name) for name in ("alice", "bob", "carol", "dave")}


def members_of(client, slug):
    return client.get(f"/api/rooms/{slug}/members")


def test_a_member_gets_the_members_sorted_by_name(client, users):
    room = services.room_create(slug="lobby", title="The Lobby", creator=users["dave"])
    for name in ("carol", "alice", "bob"):
        services.membership_add(room=room, user=users[name])
    client.force_login(users["alice"])

    response = members_of(client, "lobby")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"members": ["alice", "bob", "carol", "dave"]}


def test_a_public_room_answers_a_reader_who_is_not_a_member(client, users):
    room = services.room_create(slug="lobby", title="The Lobby")
    services.membership_add(room=room, user=users["bob"])
    client.force_login(users["carol"])

    response = members_of(client, "lobby")

    assert response.status_code == 200
    assert response.json() == {"members": ["bob"]}


def test_inactive_accounts_are_left_out(client, users):
    room = services.room_create(slug="lobby", title="The Lobby")
    for name in ("alice", "bob", "carol"):
        services.membership_add(room=room, user=users[name])
    users["bob"].is_active = False
    users["bob"].save()
    client.force_login(users["alice"])

    assert members_of(client, "lobby").json() == {"members": ["alice", "carol"]}


def test_a_private_room_is_forbidden_to_a_non_member(client, users):
    services.room_create(
        slug="secret", title="Secret", is_private=True, creator=users["alice"]
    )
    client.force_login(users["bob"])

    assert members_of(client, "secret").status_code == 403

    client.force_login(users["alice"])
    assert members_of(client, "secret").json() == {"members": ["alice"]}


def test_a_room_banned_user_is_forbidden(client, users):
    room = services.room_create(slug="lobby", title="The Lobby")
    services.membership_add(room=room, user=users["bob"])
    services.room_ban(user=users["bob"], room=room, reason="spam")
    client.force_login(users["bob"])

    assert members_of(client, "lobby").status_code == 403


def test_an_unknown_room_is_not_found(client, users):
    client.force_login(users["alice"])

    assert members_of(client, "nowhere").status_code == 404


def test_anonymous_users_are_sent_to_sign_in(client, users):
    services.room_create(slug="lobby", title="The Lobby")

    response = members_of(client, "lobby")

    assertRedirects(
        response,
        "/accounts/login/?next=/api/rooms/lobby/members",
        fetch_redirect_response=False,
    )


def test_only_safe_methods_are_allowed(client, users):
    services.room_create(slug="lobby", title="The Lobby", creator=users["alice"])
    client.force_login(users["alice"])

    assert client.post("/api/rooms/lobby/members").status_code == 405
    assert client.head("/api/rooms/lobby/members").status_code == 200
