"""The web pages, through Django's test client."""

import contextlib
import json

import pytest
from django.contrib.auth import get_user_model
from django.test import override_settings
from pytest_django.asserts import assertContains, assertNotContains, assertRedirects

from chat import services
from chat.models import Membership, Room
from chat.protocol import NOT_FOUND, ChatError
from tests.servers import RedisServer, this_process_uses_redis

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


@pytest.fixture
def carol(make_user):
    return make_user("carol")


@pytest.fixture
def rooms(alice, bob):
    """A public room, alice's private room and the direct room of alice and bob."""
    return {
        "lobby": services.room_create(slug="lobby", title="The Lobby"),
        "secret": services.room_create(
            slug="secret", title="Secret plans", is_private=True, creator=alice
        ),
        "direct": services.direct_room_get_or_create(user=alice, other=bob),
    }


def config_of(response):
    """The data the room page hands to chat.js through json_script."""
    html = response.content.decode()
    start = html.index('<script id="chat-config" type="application/json">')
    start = html.index(">", start) + 1
    return json.loads(html[start : html.index("</script>", start)])


# --- sign up, sign in, sign out -----------------------------------------------


def test_signup_creates_the_user_signs_in_and_goes_to_the_room_list(client):
    response = client.post(
        "/accounts/signup/",
        {
            "username": "dora",
            "password1": "a-long-pass-9876",
            "password2": "a-long-pass-9876",
        },
    )

    assertRedirects(response, "/")
    dora = get_user_model().objects.get(username="dora")
    assert dora.check_password("a-long-pass-9876") is True
    assert client.session["_auth_user_id"] == str(dora.pk)


def test_signup_with_different_passwords_shows_the_error_and_creates_nobody(client):
    response = client.post(
        "/accounts/signup/",
        {
            "username": "dora",
            "password1": "a-long-pass-9876",
            "password2": "other-pass-9876",
        },
    )

    assert response.status_code == 200
    assert response.context["form"].errors == {
        "password2": ["The two password fields didn’t match."]
    }
    assert get_user_model().objects.filter(username="dora").exists() is False


def sign_up(client, username, address):
    return client.post(
        "/accounts/signup/",
        {
            "username": username,
            "password1": "a-long-pass-9876",
            "password2": "a-long-pass-9876",
        },
        REMOTE_ADDR=address,
    )


@pytest.mark.parametrize(
    "storage", ["memory", pytest.param("redis", marks=pytest.mark.redis)]
)
def test_sign_ups_past_chat_signup_rate_from_one_address_are_paused(
    client, settings, storage
):
    settings.CHAT_SIGNUP_RATE = "2/3600"
    with contextlib.ExitStack() as stack:
        if storage == "redis":
            redis_server = RedisServer().start()
            stack.callback(redis_server.stop)
            stack.enter_context(this_process_uses_redis(redis_server.url))
        for name in ("dora", "erik"):
            assertRedirects(sign_up(client, name, "203.0.113.7"), "/")
            client.logout()
        paused = sign_up(client, "fred", "203.0.113.7")
        assert paused.status_code == 429
        assert paused["Retry-After"] == "3600"
        assertContains(paused, "Try again in 60 minutes.", status_code=429)
        assertRedirects(sign_up(client, "gina", "198.51.100.2"), "/")
    users = (
        get_user_model().objects.order_by("username").values_list("username", flat=True)
    )
    assert list(users) == ["dora", "erik", "gina"]


def test_chat_signup_rate_0_lets_every_sign_up_through(client, settings):
    settings.CHAT_SIGNUP_RATE = "0"
    for n in range(7):
        assertRedirects(sign_up(client, f"user{n}", "203.0.113.7"), "/")
        client.logout()


def test_signup_page_shows_the_form(client):
    response = client.get("/accounts/signup/")

    assert response.status_code == 200
    assertContains(response, '<form method="post" action="/accounts/signup/">')


def test_login_page_signs_in_and_goes_to_the_room_list(client, alice):
    response = client.post(
        "/accounts/login/", {"username": "alice", "password": "pw-for-tests-123"}
    )

    assertRedirects(response, "/")
    assert client.session["_auth_user_id"] == str(alice.pk)


def test_sign_out_is_a_post_that_goes_to_the_login_page(client, alice):
    client.force_login(alice)

    response = client.post("/accounts/logout/")

    assertRedirects(response, "/accounts/login/")
    assert "_auth_user_id" not in client.session


def test_header_has_a_sign_out_button_for_a_signed_in_user(client, alice):
    client.force_login(alice)

    response = client.get("/")

    assertContains(response, '<form method="post" action="/accounts/logout/"')
    assertContains(response, "Signed in as <strong>alice</strong>", html=False)


@pytest.mark.parametrize("path", ["/", "/r/lobby/"])
def test_pages_need_a_signed_in_user(client, path):
    response = client.get(path)

    assertRedirects(
        response, f"/accounts/login/?next={path}", fetch_redirect_response=False
    )


@pytest.mark.parametrize("path", ["/rooms/new/", "/direct/"])
def test_forms_need_a_signed_in_user(client, path):
    response = client.post(path, {})

    assertRedirects(
        response, f"/accounts/login/?next={path}", fetch_redirect_response=False
    )


# --- the room list ------------------------------------------------------------


def test_room_list_shows_a_member_public_private_and_direct_rooms(client, alice, rooms):
    client.force_login(alice)

    response = client.get("/")

    assert response.status_code == 200
    context = response.context
    assert [room.slug for room in context["public_rooms"]] == ["lobby"]
    assert [room.slug for room in context["private_rooms"]] == ["secret"]
    direct = rooms["direct"]
    assert [(room.slug, name) for room, name in context["direct_rooms"]] == [
        (direct.slug, "bob")
    ]
    assertContains(response, '<a href="/r/lobby/">The Lobby</a>', html=True)
    assertContains(response, '<a href="/r/secret/">Secret plans</a>', html=True)
    assertContains(response, f'<a href="/r/{direct.slug}/">bob</a>', html=True)


def test_room_list_shows_the_other_user_of_a_direct_room(client, bob, rooms):
    client.force_login(bob)

    response = client.get("/")

    assert [room.slug for room in response.context["public_rooms"]] == ["lobby"]
    assert response.context["private_rooms"] == []
    direct = rooms["direct"]
    assert [(room.slug, name) for room, name in response.context["direct_rooms"]] == [
        (direct.slug, "alice")
    ]
    assertContains(response, f'<a href="/r/{direct.slug}/">alice</a>', html=True)


def test_room_list_hides_private_and_direct_rooms_from_non_members(
    client, carol, rooms
):
    client.force_login(carol)

    response = client.get("/")

    assert [room.slug for room in response.context["public_rooms"]] == ["lobby"]
    assert response.context["private_rooms"] == []
    assert response.context["direct_rooms"] == []
    assertNotContains(response, "secret")
    assertNotContains(response, "Secret plans")
    assertNotContains(response, rooms["direct"].slug)


def test_room_list_escapes_room_titles(client, alice):
    services.room_create(slug="xss", title="<script>alert(1)</script>")
    client.force_login(alice)

    response = client.get("/")

    assertContains(response, "&lt;script&gt;alert(1)&lt;/script&gt;")
    assertNotContains(response, "<script>alert(1)</script>")


# --- creating a room ----------------------------------------------------------


def test_room_create_makes_the_creator_its_moderator_and_opens_it(client, alice):
    client.force_login(alice)

    response = client.post(
        "/rooms/new/", {"slug": "book-club", "title": "Book club", "is_private": "on"}
    )

    assertRedirects(response, "/r/book-club/", fetch_redirect_response=False)
    room = Room.objects.get(slug="book-club")
    assert (room.title, room.is_private, room.is_direct, room.created_by) == (
        "Book club",
        True,
        False,
        alice,
    )
    assert list(room.memberships.values_list("user__username", "role")) == [
        ("alice", Membership.Role.MODERATOR)
    ]


def test_room_create_without_a_title_uses_the_slug_and_is_public(client, alice):
    client.force_login(alice)

    response = client.post("/rooms/new/", {"slug": "general", "title": ""})

    assertRedirects(response, "/r/general/", fetch_redirect_response=False)
    room = Room.objects.get(slug="general")
    assert (room.title, room.is_private) == ("general", False)


@pytest.mark.parametrize(
    ("slug", "error"),
    [
        ("lobby", "A room with this slug already exists."),
        (
            "two words",
            "Enter a valid “slug” consisting of letters, numbers, underscores "
            "or hyphens.",
        ),
        ("dm-1-2", "Slugs starting with “dm-” are kept for direct conversations."),
        ("", "This field is required."),
        ("x" * 65, "Ensure this value has at most 64 characters (it has 65)."),
    ],
)
def test_room_create_refuses_a_bad_slug(client, alice, rooms, slug, error):
    client.force_login(alice)

    response = client.post("/rooms/new/", {"slug": slug, "title": "Anything"})

    assert response.status_code == 200
    assert response.context["create_form"].errors == {"slug": [error]}
    assert Room.objects.count() == 3


def test_room_create_of_a_slug_taken_after_the_form_check_shows_the_error(
    client, alice, rooms, monkeypatch
):
    def room_get_finds_nothing(*, slug):
        raise ChatError(NOT_FOUND, f"no room {slug!r}")

    monkeypatch.setattr("chat.forms.selectors.room_get", room_get_finds_nothing)
    client.force_login(alice)

    response = client.post("/rooms/new/", {"slug": "lobby", "title": "Again"})

    assert response.status_code == 200
    assert response.context["create_form"].errors == {
        "slug": ["A room with this slug already exists."]
    }
    assert Room.objects.get(slug="lobby").title == "The Lobby"


def test_room_create_takes_only_post(client, alice):
    client.force_login(alice)

    assert client.get("/rooms/new/").status_code == 405


# --- starting a direct conversation -------------------------------------------


def test_direct_start_opens_the_direct_room_of_both_users(client, alice, bob):
    client.force_login(alice)

    response = client.post("/direct/", {"username": "bob"})

    slug = f"dm-{min(alice.pk, bob.pk)}-{max(alice.pk, bob.pk)}"
    assertRedirects(response, f"/r/{slug}/", fetch_redirect_response=False)
    room = Room.objects.get(slug=slug)
    assert (room.is_direct, room.is_private) == (True, True)
    assert sorted(room.memberships.values_list("user__username", flat=True)) == [
        "alice",
        "bob",
    ]


def test_direct_start_again_reuses_the_same_room(client, alice, bob):
    client.force_login(alice)
    client.post("/direct/", {"username": "bob"})
    client.force_login(bob)

    response = client.post("/direct/", {"username": "alice"})

    slug = f"dm-{min(alice.pk, bob.pk)}-{max(alice.pk, bob.pk)}"
    assertRedirects(response, f"/r/{slug}/", fetch_redirect_response=False)
    assert Room.objects.filter(is_direct=True).count() == 1


def test_direct_start_with_an_unknown_user_shows_a_form_error(client, alice):
    client.force_login(alice)

    response = client.post("/direct/", {"username": "nobody"})

    assert response.status_code == 200
    assert response.context["direct_form"].errors == {
        "username": ["There is no user named “nobody”."]
    }
    assert Room.objects.count() == 0


def test_direct_start_with_an_inactive_user_shows_a_form_error(
    client, alice, make_user
):
    make_user("gone", is_active=False)
    client.force_login(alice)

    response = client.post("/direct/", {"username": "gone"})

    assert response.status_code == 200
    assert response.context["direct_form"].errors == {
        "username": ["There is no user named “gone”."]
    }
    assert Room.objects.count() == 0


# --- the room page ------------------------------------------------------------


def test_room_page_of_a_public_room_hands_slug_and_username_to_the_script(
    client, carol, rooms
):
    client.force_login(carol)

    response = client.get("/r/lobby/")

    assert response.status_code == 200
    # carol is no member until her socket joins: nothing to leave yet.
    assert config_of(response) == {
        "room": "lobby",
        "username": "carol",
        "is_private": False,
        "can_leave": False,
    }
    assertContains(response, "<h1>The Lobby</h1>", html=True)
    assertContains(response, '<ol id="messages"></ol>', html=True)
    assertContains(response, 'src="/static/chat/chat.js"')


def test_room_page_of_a_private_room_opens_for_a_member(client, alice, rooms):
    client.force_login(alice)

    response = client.get("/r/secret/")

    assert response.status_code == 200
    assert config_of(response) == {
        "room": "secret",
        "username": "alice",
        "is_private": True,
        "can_leave": True,
    }


def test_room_page_of_a_public_room_lets_a_member_leave(client, carol, rooms):
    services.membership_add(room=rooms["lobby"], user=carol)
    client.force_login(carol)

    response = client.get("/r/lobby/")

    assert config_of(response)["can_leave"] is True


def test_room_page_of_a_private_room_is_not_found_for_a_non_member(
    client, carol, rooms
):
    client.force_login(carol)

    response = client.get("/r/secret/")

    # As for a slug that is no room: the page does not tell the room is there.
    assert response.status_code == 404
    assertContains(response, "<h1>Not found</h1>", status_code=404, html=True)
    assertNotContains(response, "Secret plans", status_code=404)


def test_room_page_of_a_direct_room_is_not_found_for_a_third_user(client, carol, rooms):
    client.force_login(carol)

    response = client.get(f"/r/{rooms['direct'].slug}/")

    assert response.status_code == 404
    assertContains(response, "<h1>Not found</h1>", status_code=404, html=True)


def test_room_page_of_a_direct_room_is_titled_with_the_other_user(client, bob, rooms):
    client.force_login(bob)

    response = client.get(f"/r/{rooms['direct'].slug}/")

    assert response.status_code == 200
    assertContains(response, "<h1>alice</h1>", html=True)
    assertContains(response, "<title>alice · chatsite</title>", html=True)
    # Neither of the two may leave a direct conversation.
    assert config_of(response)["can_leave"] is False
    assert config_of(response)["is_private"] is True


def test_room_page_of_no_room_is_not_found(client, alice):
    client.force_login(alice)

    response = client.get("/r/nowhere/")

    assert response.status_code == 404


def test_room_page_escapes_the_title_and_the_config(client, make_user):
    user = make_user("eve</script>")
    services.room_create(slug="odd", title="<b>bold</b>")
    client.force_login(user)

    response = client.get("/r/odd/")

    assertContains(response, "&lt;b&gt;bold&lt;/b&gt;")
    assertNotContains(response, "<b>bold</b>")
    assert config_of(response) == {
        "room": "odd",
        "username": "eve</script>",
        "is_private": False,
        "can_leave": False,
    }


# --- Content-Security-Policy ----------------------------------------------------

POLICY = [
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self' ws://testserver",
    "img-src 'self' data:",
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
    "form-action 'self'",
]


def policy_of(response):
    """The policy's directives, sorted: django-csp joins them in a set's order."""
    return sorted(response.headers["Content-Security-Policy"].split("; "))


@pytest.fixture
def staff(make_user):
    return make_user("root", is_staff=True, is_superuser=True)


@pytest.mark.parametrize(
    ("who", "path", "status"),
    [
        (None, "/accounts/login/", 200),
        (None, "/accounts/signup/", 200),
        (None, "/", 302),
        ("alice", "/", 200),
        ("alice", "/r/lobby/", 200),
        ("carol", "/r/secret/", 404),
        ("alice", "/r/nowhere/", 404),
        ("alice", "/accounts/password_change/", 200),
        (None, "/admin/login/", 200),
        ("root", "/admin/", 200),
        ("root", "/admin/chat/room/", 200),
        ("root", "/admin/chat/room/add/", 200),
        ("root", "/admin/chat/room/live/", 200),
        ("root", "/admin/auth/user/", 200),
        ("root", "/admin/axes/accessattempt/", 200),
        (None, "/api/push", 405),
    ],
)
def test_every_page_carries_the_policy(client, rooms, staff, carol, who, path, status):
    users = {"alice": rooms["secret"].created_by, "carol": carol, "root": staff}
    if who is not None:
        client.force_login(users[who])

    response = client.get(path)

    assert response.status_code == status
    assert policy_of(response) == sorted(POLICY)


def test_the_admin_change_form_carries_the_policy(client, rooms, staff):
    client.force_login(staff)

    response = client.get(f"/admin/chat/room/{rooms['lobby'].pk}/change/")

    assert response.status_code == 200
    assert policy_of(response) == sorted(POLICY)


def test_the_csrf_failure_page_is_the_site_s_and_carries_the_policy(alice):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)

    response = client.post("/rooms/new/", {"slug": "nope"})

    assert response.status_code == 403
    assertContains(response, "<h1>Form not accepted</h1>", status_code=403, html=True)
    assert policy_of(response) == sorted(POLICY)


def test_over_https_the_socket_source_is_wss(client, alice):
    client.force_login(alice)

    response = client.get("/", secure=True)

    assert response.status_code == 200
    assert "connect-src 'self' wss://testserver" in policy_of(response)
    assert "connect-src 'self' ws://testserver" not in policy_of(response)


def test_the_socket_source_keeps_the_port(client):
    response = client.get("/accounts/login/", HTTP_HOST="localhost:8000")

    assert "connect-src 'self' ws://localhost:8000" in policy_of(response)


@override_settings(ALLOWED_HOSTS=["[::1]"])
def test_an_ipv6_host_leaves_connect_src_to_self(client):
    # CSP has no syntax for an IPv6 literal; CSP3's 'self' covers the socket.
    response = client.get("/accounts/login/", HTTP_HOST="[::1]:8000")

    assert response.status_code == 200
    assert "connect-src 'self'" in policy_of(response)


def test_a_host_not_allowed_is_a_400_with_connect_src_self_only(client):
    response = client.get("/accounts/login/", HTTP_HOST="evil.example")

    assert response.status_code == 400
    assertContains(response, "<h1>Bad request</h1>", status_code=400, html=True)
    assert "connect-src 'self'" in policy_of(response)
