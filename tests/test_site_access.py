"""Who reaches the site over HTTP: site bans (SiteBanMiddleware), GET /api/me,
room bans on the room page; and the site's name and icon on every page."""

from datetime import UTC, datetime

import pytest
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from pytest_django.asserts import assertContains, assertNotContains

from chat import services, views
from tests.test_views import POLICY, policy_of

pytestmark = pytest.mark.django_db

UNTIL = datetime(2030, 3, 5, 14, 0, tzinfo=UTC)


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def lobby(alice):
    room = services.room_create(slug="lobby", title="The Lobby")
    services.membership_add(room=room, user=alice)
    return room


@pytest.fixture
def banned(client, alice, lobby):
    """alice, signed in and banned from the whole site for good."""
    services.user_ban(user=alice, reason="spam")
    client.force_login(alice)
    return alice


def ban_queries(queries):
    return [q["sql"] for q in queries.captured_queries if '"chat_ban"' in q["sql"]]


# --- a site-wide ban closes the site's pages ---------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/r/lobby/", "/accounts/password_change/", "/accounts/signup/"]
)
def test_a_site_banned_user_gets_the_ban_page_on_every_page(client, banned, path):
    response = client.get(path)

    assert response.status_code == 403
    assertContains(
        response, "<h1>You are banned from this site</h1>", status_code=403, html=True
    )
    assertContains(response, "<p>Reason: spam</p>", status_code=403, html=True)
    assertContains(
        response, "<p>Banned with no end date.</p>", status_code=403, html=True
    )
    assertContains(response, "<title>Banned · chatsite</title>", status_code=403)
    assert policy_of(response) == sorted(POLICY)


def test_the_ban_page_says_until_when_a_ban_with_an_end_lasts(client, alice, lobby):
    services.user_ban(user=alice, reason="cool off", expires_at=UNTIL)
    client.force_login(alice)

    response = client.get("/")

    assert response.status_code == 403
    assertContains(response, "<p>Reason: cool off</p>", status_code=403, html=True)
    assertContains(
        response,
        '<p>Banned until <time datetime="2030-03-05T14:00:00+00:00">'
        "5 March 2030, 14:00 UTC</time>.</p>",
        status_code=403,
        html=True,
    )


def test_of_two_bans_the_page_names_the_one_that_lasts_longer(client, alice, lobby):
    services.user_ban(user=alice, reason="short", expires_at=UNTIL)
    services.user_ban(user=alice, reason="for good")
    client.force_login(alice)

    response = client.get("/")

    assertContains(response, "<p>Reason: for good</p>", status_code=403, html=True)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/rooms/lobby/members"),
        ("post", "/api/rooms/lobby/members"),
        ("post", "/api/rooms/lobby/leave"),
        ("post", "/api/uploads"),
    ],
)
def test_the_api_answers_a_site_banned_user_in_json(client, banned, method, path):
    response = getattr(client, method)(path)

    assert (response.status_code, response.json()) == (
        403,
        {"error": "banned: spam"},
    )


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("get", "/api/me", 200),
        ("get", "/accounts/login/", 200),
        ("post", "/accounts/logout/", 302),
        ("get", "/healthz", 200),
        ("get", "/metrics", 200),
    ],
)
def test_signing_in_and_out_api_me_and_the_probes_stay_open_to_a_banned_user(
    client, banned, method, path, status
):
    assert getattr(client, method)(path).status_code == status


def test_the_admin_stays_open_to_banned_staff(client, make_user):
    root = make_user("root", is_staff=True, is_superuser=True)
    services.user_ban(user=root, reason="oops")
    client.force_login(root)

    assert client.get("/admin/").status_code == 200
    assert client.get("/").status_code == 403


def test_an_ended_ban_and_a_room_ban_leave_the_site_open(client, alice, lobby):
    services.user_ban(
        user=alice, reason="old", expires_at=datetime(2020, 1, 1, tzinfo=UTC)
    )
    services.room_ban(user=alice, room=lobby, reason="noisy")
    client.force_login(alice)

    assert client.get("/").status_code == 200


def test_the_ban_check_is_one_query_for_a_signed_in_user_and_none_otherwise(
    client, alice, lobby
):
    client.force_login(alice)
    with CaptureQueriesContext(connection) as signed_in:
        assert client.get("/").status_code == 200
    with CaptureQueriesContext(connection) as probe:
        assert client.get("/healthz").status_code == 200
    with CaptureQueriesContext(connection) as anonymous:
        assert Client().get("/accounts/login/").status_code == 200

    assert len(ban_queries(signed_in)) == 1
    assert ban_queries(probe) == []  # an exempt path
    assert ban_queries(anonymous) == []


# --- GET /api/me ------------------------------------------------------------------


def test_api_me_of_a_visitor_is_nobody(client):
    response = client.get("/api/me")

    assert (response.status_code, response.json()) == (
        200,
        {"user": None, "banned": None},
    )
    assert response["Cache-Control"] == "no-store"


def test_api_me_names_the_signed_in_user(client, alice):
    client.force_login(alice)

    response = client.get("/api/me")

    assert response.json() == {
        "user": {"id": alice.pk, "username": "alice"},
        "banned": None,
    }
    assert response["Cache-Control"] == "no-store"


def test_api_me_says_why_and_until_when_a_user_is_banned(client, alice):
    services.user_ban(user=alice, reason="spam", expires_at=UNTIL)
    client.force_login(alice)

    assert client.get("/api/me").json() == {
        "user": {"id": alice.pk, "username": "alice"},
        "banned": {"reason": "spam", "until": "2030-03-05T14:00:00.000Z"},
    }


def test_api_me_of_a_ban_with_no_end_has_until_null(client, banned):
    assert client.get("/api/me").json()["banned"] == {"reason": "spam", "until": None}


def test_api_me_is_of_the_session_only_not_of_a_token(alice, token_for):
    script = Client(headers={"Authorization": f"Bearer {token_for(alice)}"})

    assert script.get("/api/me").json() == {"user": None, "banned": None}


def test_api_me_takes_only_safe_methods(client, alice):
    client.force_login(alice)

    assert client.post("/api/me").status_code == 405


# --- a room ban on the room page -------------------------------------------------


def test_a_room_banned_user_gets_the_rooms_ban_page(client, alice, lobby):
    services.room_ban(user=alice, room=lobby, reason="noisy", expires_at=UNTIL)
    client.force_login(alice)

    response = client.get("/r/lobby/")

    assert response.status_code == 403
    assertContains(
        response, "<h1>You are banned from The Lobby</h1>", status_code=403, html=True
    )
    assertContains(response, "<p>Reason: noisy</p>", status_code=403, html=True)
    assertContains(response, "5 March 2030, 14:00 UTC", status_code=403)
    assertContains(
        response, '<a href="/">Back to the rooms</a>', status_code=403, html=True
    )
    assertNotContains(response, 'id="chat-config"', status_code=403)


# --- the site's name and icon ------------------------------------------------------


def test_pages_are_titled_and_headed_with_the_sites_name(client, alice, lobby):
    client.force_login(alice)

    rooms, room = client.get("/"), client.get("/r/lobby/")

    assertContains(rooms, "<title>Rooms · chatsite</title>")
    assertContains(room, "<title>The Lobby · chatsite</title>")
    assertContains(rooms, '<a class="brand" href="/">chatsite</a>', html=True)


def test_chat_site_name_renames_the_site_on_every_page(client, settings):
    settings.CHAT_SITE_NAME = "Acme <Chat>"

    response = client.get("/accounts/login/")

    assertContains(response, "<title>Sign in · Acme &lt;Chat&gt;</title>")
    assertContains(response, '<a class="brand" href="/">Acme &lt;Chat&gt;</a>')


def test_the_server_error_page_names_the_site_too(settings):
    settings.CHAT_SITE_NAME = "Acme"

    response = views.server_error(RequestFactory().get("/"))

    assert response.status_code == 500
    assertContains(response, "<title>Server error · Acme</title>", status_code=500)


def test_every_page_links_the_icon_and_favicon_ico_leads_to_it(client):
    page = client.get("/accounts/login/")
    icon = client.get("/favicon.ico")

    assertContains(
        page,
        '<link rel="icon" href="/static/chat/favicon.svg" type="image/svg+xml">',
        html=True,
    )
    assert (icon.status_code, icon["Location"]) == (302, "/static/chat/favicon.svg")
