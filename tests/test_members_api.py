"""/api/rooms/<slug>/members and /leave: the room page's @mention autocomplete,
people list, invitations and leaving."""

import json

import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from pytest_django.asserts import assertRedirects

from chat import services
from chat.models import Membership

pytestmark = pytest.mark.django_db

adb = sync_to_async


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
    # dave created the room (public): there is no one to invite to it.
    assert response.json() == {
        "members": ["alice", "bob", "carol", "dave"],
        "can_invite": False,
    }


def test_a_public_room_answers_a_reader_who_is_not_a_member(client, users):
    room = services.room_create(slug="lobby", title="The Lobby")
    services.membership_add(room=room, user=users["bob"])
    client.force_login(users["carol"])

    response = members_of(client, "lobby")

    assert response.status_code == 200
    assert response.json() == {"members": ["bob"], "can_invite": False}


def test_inactive_accounts_are_left_out(client, users):
    room = services.room_create(slug="lobby", title="The Lobby")
    for name in ("alice", "bob", "carol"):
        services.membership_add(room=room, user=users[name])
    users["bob"].is_active = False
    users["bob"].save()
    client.force_login(users["alice"])

    assert members_of(client, "lobby").json() == {
        "members": ["alice", "carol"],
        "can_invite": False,
    }


def test_a_private_room_is_not_found_for_a_non_member_as_an_unknown_one_is(
    client, users
):
    services.room_create(
        slug="secret", title="Secret", is_private=True, creator=users["alice"]
    )
    client.force_login(users["bob"])

    hidden, unknown = members_of(client, "secret"), members_of(client, "nowhere")

    assert (hidden.status_code, hidden.json()) == (404, {"error": "no room 'secret'"})
    assert (unknown.status_code, unknown.json()) == (
        404,
        {"error": "no room 'nowhere'"},
    )
    client.force_login(users["alice"])
    assert members_of(client, "secret").json() == {
        "members": ["alice"],
        "can_invite": True,
    }


def test_a_room_banned_user_is_forbidden(client, users):
    room = services.room_create(slug="lobby", title="The Lobby")
    services.membership_add(room=room, user=users["bob"])
    services.room_ban(user=users["bob"], room=room, reason="spam")
    client.force_login(users["bob"])

    response = members_of(client, "lobby")

    assert (response.status_code, response.json()) == (
        403,
        {"error": "you are banned from 'lobby': spam"},
    )


def test_anonymous_users_are_sent_to_sign_in(client, users):
    services.room_create(slug="lobby", title="The Lobby")

    response = members_of(client, "lobby")

    assertRedirects(
        response,
        "/accounts/login/?next=/api/rooms/lobby/members",
        fetch_redirect_response=False,
    )


def test_only_get_head_and_post_are_allowed(client, users):
    services.room_create(slug="lobby", title="The Lobby", creator=users["alice"])
    client.force_login(users["alice"])

    assert client.put("/api/rooms/lobby/members").status_code == 405
    assert client.delete("/api/rooms/lobby/members").status_code == 405
    assert client.head("/api/rooms/lobby/members").status_code == 200
    assert client.get("/api/rooms/lobby/leave").status_code == 405


def test_a_moderator_who_did_not_create_the_room_may_invite(client, users):
    room = services.room_create(
        slug="secret", title="Secret", is_private=True, creator=users["alice"]
    )
    services.membership_add(
        room=room, user=users["bob"], role=Membership.Role.MODERATOR
    )
    services.membership_add(room=room, user=users["carol"])
    client.force_login(users["bob"])

    assert members_of(client, "secret").json()["can_invite"] is True
    client.force_login(users["carol"])
    assert members_of(client, "secret").json()["can_invite"] is False


# --- POST /api/rooms/<slug>/members: invite --------------------------------------


def invite(client, slug, body, content_type="application/json"):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(f"/api/rooms/{slug}/members", data, content_type=content_type)


def answer(response):
    return response.status_code, response.json()


@pytest.fixture
def secret(users):
    """alice's private room, of which carol is a plain member."""
    room = services.room_create(
        slug="secret", title="Secret", is_private=True, creator=users["alice"]
    )
    services.membership_add(room=room, user=users["carol"])
    return room


def test_the_owner_invites_a_user_who_becomes_a_member_with_the_room_read(
    client, users, secret
):
    services.message_create(
        room=secret, author=users["alice"], body="before bob", client_msg_id="m1"
    )
    client.force_login(users["alice"])

    assert answer(invite(client, "secret", {"username": "bob"})) == (
        201,
        {"member": "bob"},
    )
    membership = Membership.objects.get(room=secret, user=users["bob"])
    assert (membership.role, membership.read_seq) == (Membership.Role.MEMBER, 1)
    assert members_of(client, "secret").json() == {
        "members": ["alice", "bob", "carol"],
        "can_invite": True,
    }


def test_inviting_a_member_again_is_200_and_changes_nothing(client, users, secret):
    client.force_login(users["alice"])

    assert answer(invite(client, "secret", {"username": "carol"})) == (
        200,
        {"member": "carol"},
    )
    assert Membership.objects.filter(room=secret).count() == 2


def test_a_plain_member_may_not_invite(client, users, secret):
    client.force_login(users["carol"])

    assert answer(invite(client, "secret", {"username": "bob"})) == (
        403,
        {"error": "only the room's owner or a moderator may invite"},
    )
    assert not Membership.objects.filter(room=secret, user=users["bob"]).exists()


INVITE_BODY = 'send Content-Type: application/json and {"username": "<name>"}'


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        ({"username": "nobody"}, "application/json", "no user 'nobody'"),
        ("{not json", "application/json", INVITE_BODY),
        (["bob"], "application/json", INVITE_BODY),
        ({"username": 7}, "application/json", INVITE_BODY),
        ({"username": ""}, "application/json", INVITE_BODY),
        ({}, "application/json", INVITE_BODY),
        ("username=bob", "application/x-www-form-urlencoded", INVITE_BODY),
    ],
)
def test_a_bad_invitation_is_400_naming_the_fix(
    client, users, secret, body, content_type, error
):
    client.force_login(users["alice"])

    response = invite(client, "secret", body, content_type=content_type)

    assert answer(response) == (400, {"error": error})
    assert Membership.objects.filter(room=secret).count() == 2


def test_an_inactive_user_cannot_be_invited(client, users, secret):
    users["bob"].is_active = False
    users["bob"].save()
    client.force_login(users["alice"])

    assert answer(invite(client, "secret", {"username": "bob"})) == (
        400,
        {"error": "no user 'bob'"},
    )


def test_public_and_direct_rooms_take_no_invitations(client, users):
    services.room_create(slug="lobby", title="The Lobby", creator=users["alice"])
    direct = services.direct_room_get_or_create(user=users["alice"], other=users["bob"])
    client.force_login(users["alice"])

    assert answer(invite(client, "lobby", {"username": "bob"})) == (
        400,
        {"error": "anyone may join a public room"},
    )
    assert answer(invite(client, direct.slug, {"username": "carol"})) == (
        400,
        {"error": "a direct conversation has two members"},
    )


def test_an_invitation_to_a_room_one_cannot_read_is_404(client, users, secret):
    client.force_login(users["bob"])

    assert answer(invite(client, "secret", {"username": "dave"})) == (
        404,
        {"error": "no room 'secret'"},
    )
    assert answer(invite(client, "nowhere", {"username": "dave"})) == (
        404,
        {"error": "no room 'nowhere'"},
    )


def test_an_invitation_needs_the_sessions_csrf_token_or_a_token(
    users, secret, token_for
):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(users["alice"])
    browser.get("/r/secret/")  # sets the CSRF cookie, as the room page does
    csrf = browser.cookies["csrftoken"].value

    assert answer(invite(browser, "secret", {"username": "bob"})) == (
        403,
        {"error": "the CSRF token is missing or wrong"},
    )
    accepted = browser.post(
        "/api/rooms/secret/members",
        json.dumps({"username": "bob"}),
        content_type="application/json",
        headers={"X-CSRFToken": csrf},
    )
    assert answer(accepted) == (201, {"member": "bob"})
    script = Client(headers={"Authorization": f"Bearer {token_for(users['alice'])}"})
    assert answer(invite(script, "secret", {"username": "dave"})) == (
        201,
        {"member": "dave"},
    )
    assert answer(invite(Client(), "secret", {"username": "dave"})) == (
        401,
        {"error": "sign in, or send Authorization: Bearer <token>"},
    )


@pytest.mark.django_db(transaction=True)
async def test_the_invited_users_socket_lists_and_joins_the_room_after_it(
    connect, users, secret
):
    bob_socket = await connect(users["bob"])
    assert (await bob_socket.join("secret"))["code"] == "forbidden"
    client = Client()
    await adb(client.force_login)(users["alice"])

    response = await adb(invite)(client, "secret", {"username": "bob"})

    assert response.status_code == 201
    # No frame of its own (membership_add sends none): the list the sidebar asks
    # for on each (re)connect has the room, and a join is let in.
    assert await bob_socket.nothing() is True
    listed = await bob_socket.request(type="rooms", ref="r")
    assert [entry["room"] for entry in listed["rooms"]] == ["secret"]
    joined = await bob_socket.join("secret")
    assert (joined["type"], joined["room"]) == ("joined", "secret")


# --- POST /api/rooms/<slug>/leave -------------------------------------------------


def leave(client, slug):
    return client.post(
        f"/api/rooms/{slug}/leave", "{}", content_type="application/json"
    )


def test_a_member_leaves_a_private_room_and_can_no_longer_read_it(
    client, users, secret
):
    client.force_login(users["carol"])

    assert answer(leave(client, "secret")) == (200, {"left": "secret"})
    assert not Membership.objects.filter(room=secret, user=users["carol"]).exists()
    assert client.get("/r/secret/").status_code == 404
    assert answer(leave(client, "secret")) == (404, {"error": "no room 'secret'"})


def test_leaving_a_public_room_twice_is_400_the_second_time(client, users):
    room = services.room_create(slug="lobby", title="The Lobby")
    services.membership_add(room=room, user=users["bob"])
    client.force_login(users["bob"])

    assert answer(leave(client, "lobby")) == (200, {"left": "lobby"})
    assert answer(leave(client, "lobby")) == (
        400,
        {"error": "you are not a member of this room"},
    )


def test_a_direct_conversation_cannot_be_left(client, users):
    direct = services.direct_room_get_or_create(user=users["alice"], other=users["bob"])
    client.force_login(users["alice"])

    assert answer(leave(client, direct.slug)) == (
        400,
        {"error": "you cannot leave a direct conversation"},
    )
    assert Membership.objects.filter(room=direct).count() == 2


def test_leaving_needs_a_signed_in_user_and_the_csrf_token(users, secret):
    assert answer(leave(Client(), "secret")) == (
        401,
        {"error": "sign in, or send Authorization: Bearer <token>"},
    )
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(users["carol"])
    assert answer(leave(browser, "secret")) == (
        403,
        {"error": "the CSRF token is missing or wrong"},
    )
    assert Membership.objects.filter(room=secret, user=users["carol"]).exists()


@pytest.mark.django_db(transaction=True)
async def test_leaving_a_private_room_removes_the_users_sockets_from_it(
    connect, users, secret
):
    socket = await connect(users["carol"])
    assert (await socket.join("secret"))["type"] == "joined"
    client = Client()
    await adb(client.force_login)(users["carol"])

    response = await adb(leave)(client, "secret")

    assert response.status_code == 200
    assert await socket.recv() == {
        "type": "removed",
        "room": "secret",
        "reason": "you are no longer a member of the room",
    }
