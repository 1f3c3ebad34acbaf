"""The ``/ws/`` handshake (``chat.application``) through the real ASGI application."""

import re
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.test import Client as HttpClient
from django.utils import timezone

from chat import fanout, registry, services
from chat.models import ApiToken
from tests.waiting import until

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async

# This process's id, then a counter (chat.consumers).
CONNECTION_ID = re.compile(rf"{re.escape(fanout.PROCESS_ID)}-[1-9][0-9]*")


async def session_cookie(user):
    http = HttpClient()
    await adb(http.force_login)(user)
    return f"sessionid={http.cookies['sessionid'].value}".encode()


def browser_headers(cookie, *, origin=b"http://testserver", host=b"testserver"):
    """What a browser on this site sends: its cookie, our Host, its page's Origin."""
    return [(b"cookie", cookie), (b"host", host), (b"origin", origin)]


async def assert_let_in(socket, user):
    """The socket is open, greeted as ``user``, and the one live connection."""
    assert socket.connected is True
    connection_id = socket.hello["connection_id"]
    assert CONNECTION_ID.fullmatch(connection_id), connection_id
    assert socket.hello == {
        "type": "hello",
        "protocol": 1,
        "connection_id": connection_id,
        "user": {"id": user.pk, "username": user.username},
        "heartbeat": 30,
    }
    live = await registry.live_connections()
    assert [(c["id"], c["user_id"]) for c in live] == [(connection_id, user.pk)]


async def assert_refused(socket):
    """The handshake was refused and left no live connection behind."""
    assert socket.connected is False
    assert await registry.live_connections() == []


# --- credentials -------------------------------------------------------------------


async def test_handshake_without_credentials_is_refused(connect):
    client = await connect(path="/ws/")

    await assert_refused(client)


async def test_handshake_with_unknown_token_is_refused(connect):
    client = await connect(path="/ws/?token=cs_not-a-real-token")

    await assert_refused(client)


async def test_handshake_with_revoked_token_is_refused(connect, alice):
    token, key = await adb(services.api_token_create)(user=alice)
    await adb(services.api_token_revoke)(token=token)

    client = await connect(path=f"/ws/?token={key}")

    await assert_refused(client)


async def test_token_of_a_deactivated_user_is_refused(connect, make_user):
    carol = await adb(make_user)("carol")
    _, key = await adb(services.api_token_create)(user=carol)
    carol.is_active = False
    await adb(carol.save)()

    client = await connect(path=f"/ws/?token={key}")

    await assert_refused(client)


async def test_bearer_header_authenticates(connect, alice):
    _, key = await adb(services.api_token_create)(user=alice)

    client = await connect(
        path="/ws/", headers=[(b"authorization", f"Bearer {key}".encode())]
    )

    await assert_let_in(client, alice)


async def test_session_cookie_authenticates(connect, alice):
    cookie = await session_cookie(alice)

    client = await connect(
        path="/ws/",
        headers=browser_headers(cookie),
    )

    await assert_let_in(client, alice)


async def test_session_of_a_deactivated_user_is_refused(connect, make_user):
    carol = await adb(make_user)("carol")
    cookie = await session_cookie(carol)
    carol.is_active = False
    await adb(carol.save)()

    client = await connect(path="/ws/", headers=browser_headers(cookie))

    await assert_refused(client)


async def test_a_bad_token_refuses_even_with_a_good_session(connect, alice):
    cookie = await session_cookie(alice)

    client = await connect(
        path="/ws/?token=cs_not-a-real-token", headers=[(b"cookie", cookie)]
    )

    await assert_refused(client)


async def test_a_handshake_notes_the_tokens_use_at_most_once_a_minute(connect, alice):
    token, key = await adb(services.api_token_create)(user=alice)
    assert token.last_used_at is None

    before = timezone.now()
    await connect(path=f"/ws/?token={key}")
    # Noted, not written: the handshake itself only reads.
    await adb(token.refresh_from_db)()
    assert token.last_used_at is None
    await services.api_token_uses_write()
    after = timezone.now()
    await adb(token.refresh_from_db)()
    first_use = token.last_used_at
    assert before <= first_use <= after

    await connect(path=f"/ws/?token={key}")
    await services.api_token_uses_write()
    await adb(token.refresh_from_db)()
    assert token.last_used_at == first_use

    # Older than a minute: the next handshake notes it again.
    an_hour_ago = first_use - timedelta(hours=1)
    await adb(ApiToken.objects.filter(pk=token.pk).update)(last_used_at=an_hour_ago)
    before = timezone.now()
    await connect(path=f"/ws/?token={key}")
    await services.api_token_uses_write()
    after = timezone.now()
    await adb(token.refresh_from_db)()
    assert before <= token.last_used_at <= after


async def test_the_uses_of_many_handshakes_are_written_together_within_a_second(
    connect, alice, bob
):
    tokens = []
    for user in (alice, alice, bob):
        token, key = await adb(services.api_token_create)(user=user)
        tokens.append(token)
        await connect(path=f"/ws/?token={key}")
    noted_at = timezone.now()

    async def uses():
        ids = [t.pk for t in tokens]
        rows = ApiToken.objects.filter(pk__in=ids).values_list(
            "last_used_at", flat=True
        )
        return await adb(list)(rows)

    assert await uses() == [None, None, None]
    written = await until(uses, lambda found: None not in found, timeout=3, what="uses")
    # One UPDATE: one time for all three, after the second the writer waits.
    assert len(set(written)) == 1
    assert written[0] >= noted_at


# --- where from --------------------------------------------------------------------


async def test_foreign_origin_is_refused(connect, alice):
    _, key = await adb(services.api_token_create)(user=alice)

    client = await connect(
        path=f"/ws/?token={key}", headers=[(b"origin", b"https://evil.example")]
    )

    await assert_refused(client)


async def test_a_session_cookie_without_an_origin_is_refused(connect, alice):
    cookie = await session_cookie(alice)

    client = await connect(path="/ws/", headers=[(b"cookie", cookie)])

    await assert_refused(client)


async def test_a_token_without_an_origin_is_let_in(connect, alice):
    client = await connect(alice)

    await assert_let_in(client, alice)


@pytest.mark.parametrize(
    "origin",
    [
        b"null",
        b"http://testserver:8001",
        b"https://testserver",
        b"http://testserver.evil.example",
        b"http://evil.example",
        b"ftp://testserver",
        b"http://testserver:notaport",
    ],
)
async def test_an_origin_of_another_scheme_host_or_port_is_refused(
    connect, alice, origin
):
    cookie = await session_cookie(alice)

    client = await connect(path="/ws/", headers=browser_headers(cookie, origin=origin))

    await assert_refused(client)


async def test_the_same_origin_on_a_port_is_let_in(connect, alice):
    cookie = await session_cookie(alice)
    headers = browser_headers(
        cookie, origin=b"http://localhost:8000", host=b"localhost:8000"
    )

    client = await connect(path="/ws/", headers=headers)

    await assert_let_in(client, alice)


async def test_a_host_outside_allowed_hosts_is_no_origin_of_ours(connect, alice):
    cookie = await session_cookie(alice)
    headers = browser_headers(
        cookie, origin=b"http://evil.example", host=b"evil.example"
    )

    client = await connect(path="/ws/", headers=headers)

    await assert_refused(client)


async def test_allowed_origins_are_matched_by_scheme_host_and_port(
    connect, alice, settings
):
    settings.CHAT_ALLOWED_ORIGINS = ["https://chat.example.com"]
    cookie = await session_cookie(alice)

    for refused in (b"http://chat.example.com", b"https://chat.example.com:8443"):
        client = await connect(
            path="/ws/", headers=browser_headers(cookie, origin=refused)
        )
        await assert_refused(client)
    client = await connect(
        path="/ws/",
        headers=browser_headers(cookie, origin=b"https://chat.example.com:443"),
    )
    await assert_let_in(client, alice)


async def test_handshake_on_another_path_is_refused(connect, alice):
    _, key = await adb(services.api_token_create)(user=alice)

    client = await connect(path=f"/ws/other/?token={key}")

    await assert_refused(client)


# --- site ban ----------------------------------------------------------------------


async def test_site_ban_refuses_a_token_handshake(connect, alice, bob):
    await adb(services.user_ban)(user=bob, reason="spamming", actor=alice)

    refused = await connect(bob)

    assert refused.connected is False
    assert await registry.live_connections() == []


async def test_site_ban_refuses_a_session_cookie_handshake(connect, alice, bob):
    cookie = await session_cookie(bob)
    before = await connect(path="/ws/", headers=browser_headers(cookie))
    await assert_let_in(before, bob)

    await adb(services.user_ban)(user=bob, reason="spamming", actor=alice)

    after = await connect(path="/ws/", headers=browser_headers(cookie))
    assert after.connected is False


async def test_expired_site_ban_lets_the_user_in(connect, bob):
    past = timezone.now() - timedelta(minutes=1)
    await adb(services.user_ban)(user=bob, reason="old", expires_at=past)

    socket = await connect(bob)

    await assert_let_in(socket, bob)


async def test_lifted_site_ban_lets_the_user_in(connect, bob):
    ban = await adb(services.user_ban)(user=bob, reason="oops")
    await adb(services.ban_lift)(ban=ban)

    socket = await connect(bob)

    await assert_let_in(socket, bob)


# --- HTTP ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/static/%2e%2e/chatsite/settings.py",
        "/static/../chatsite/settings.py",
        "/static/chat/%2e%2e/%2e%2e/manage.py",
        "/static/no/such/file.js",
    ],
)
async def test_a_static_path_outside_the_static_files_is_404(path):
    from channels.testing import HttpCommunicator

    from chatsite.asgi import application

    response = await HttpCommunicator(application, "GET", path).get_response(timeout=5)
    assert response["status"] == 404
