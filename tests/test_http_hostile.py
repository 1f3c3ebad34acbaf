"""Every HTTP endpoint, fed hostile input through the real ASGI application.

Each request is made as daphne hands it over: the path percent-decoded with
undecodable bytes replaced (``%ED%A0%80``, a lone surrogate, becomes U+FFFD),
``%00`` decoded to NUL, the query string as sent. Every answer is an exact
400, 403, 404 or 405 (or the page itself), never a 500: the tables below hold
each status, and run on SQLite and on PostgreSQL, which refuses NUL in text.
"""

import gc
from urllib.parse import unquote

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test import Client as HttpClient

from chat import services
from chatsite.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

CSRF = "A" * 32  # an unmasked CSRF secret: Django takes it as cookie and token
FORM = (b"content-type", b"application/x-www-form-urlencoded")


async def http(method, target, *, body=b"", headers=()):
    """``(status, headers, body)`` of one request through ``chatsite.asgi``."""
    raw_path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("198.51.100.7", 50000),
        "server": ("testserver", 80),
    }
    app = ApplicationCommunicator(application, scope)
    await app.send_input({"type": "http.request", "body": body})
    start = await app.receive_output(10)
    content = b""
    while True:
        chunk = await app.receive_output(10)
        content += chunk.get("body", b"")
        if not chunk.get("more_body"):
            break
    await app.wait(10)
    # Under ASGI each request runs in a thread of its own, and with CONN_MAX_AGE
    # its database connection is left to the garbage collector (which
    # chat.policies.tune_gc makes rare): collect, or a table of requests runs
    # PostgreSQL out of connections.
    gc.collect()
    headers = {name.lower(): value for name, value in start["headers"]}
    return start["status"], headers, content


@pytest.fixture(autouse=True)
def close_pool_thread_connections():
    """Close the database connections the event loop's worker threads keep.

    Django renders an error page that an exception led to (a 404 here) in a thread
    of the loop's default executor; the thread lives on, and so does its connection
    (CONN_MAX_AGE): left open, PostgreSQL will not drop the test database.
    """
    yield
    for wrapper in gc.get_objects():
        # type(), not isinstance(): that would evaluate lazy objects (csp_nonce).
        if (
            issubclass(type(wrapper), BaseDatabaseWrapper)
            and wrapper.connection is not None
        ):
            wrapper.inc_thread_sharing()
            wrapper.close()
            wrapper.dec_thread_sharing()


def _site():
    user_model = get_user_model()
    alice = user_model.objects.create_user("alice", password="pw-for-tests-123")
    root = user_model.objects.create_superuser("root", "root@example.com", "pw")
    pusher = user_model.objects.create_user("pusher")
    pusher.user_permissions.add(Permission.objects.get(codename="push_message"))
    room = services.room_create(slug="lobby", title="The Lobby", creator=alice)
    services.message_create(room=room, author=alice, body="hi", client_msg_id="c1")
    sessions = {}
    for user in (alice, root):
        client = HttpClient()
        client.force_login(user)
        sessions[user.username] = client.cookies["sessionid"].value
    return {
        "sessions": sessions,
        "key": services.api_token_create(user=pusher)[1],
        "room": room.pk,
    }


@pytest.fixture
async def site():
    return await sync_to_async(_site)()


def cookie(site, who, *, csrf=True):
    """The Cookie header of ``who`` (None: nobody), with the CSRF cookie."""
    parts = [f"sessionid={site['sessions'][who]}"] if who else []
    if csrf:
        parts.append(f"csrftoken={CSRF}")
    return (b"cookie", "; ".join(parts).encode())


async def statuses(site, cases):
    """``{case: status}`` for ``(method, target, who[, body[, headers]])`` cases."""
    answers = {}
    for method, target, who, *more in cases:
        body, headers = [*more, b"", ()][:2]
        if method == "POST" and not headers:
            body = f"csrfmiddlewaretoken={CSRF}&".encode() + body
            headers = (FORM,)
        elif method not in ("GET", "HEAD"):
            headers = ((b"x-csrftoken", CSRF.encode()), *headers)
        status, _, _ = await http(
            method, target, body=body, headers=[cookie(site, who), *headers]
        )
        answers[(method, target, who, *more)] = status
    return answers


def expected(table):
    return {case[:-1]: case[-1] for case in table}


# --- the site's pages -----------------------------------------------------------

SITE_GETS = [
    ("GET", "/", None, 302),
    ("GET", "/", "alice", 200),
    ("GET", "/?page=abc", "alice", 200),
    ("GET", "/?page=99999999999999999999", "alice", 200),
    ("GET", "/?page=-1&page=%ED%A0%80", "alice", 200),
    ("GET", "/?x=%ED%A0%80", "alice", 200),
    ("GET", "/?%ED%A0%80", "alice", 200),
    ("GET", "/?x=%00", "alice", 400),
    ("GET", "/?%00=x", None, 400),
    ("GET", "/?a=%zz&&&==&b", "alice", 200),
    ("GET", "/%00", "alice", 400),
    ("GET", "/%ED%A0%80", "alice", 404),
    ("GET", "/nowhere/", "alice", 404),
    ("GET", "/r/lobby/", "alice", 200),
    ("GET", "/r/lobby/?since=%00", "alice", 400),
    ("GET", "/r/lobby/?since=99999999999999999999", "alice", 200),
    ("GET", "/r/lob%00by/", "alice", 400),
    ("GET", "/r/%ED%A0%80/", "alice", 404),
    ("GET", "/r/lobby%ED%A0%80/", "alice", 404),
    ("GET", "/r/nowhere/", "alice", 404),
    ("GET", "/r/" + "x" * 5000 + "/", "alice", 404),
    ("GET", "/r/lobby/", None, 302),
    ("GET", "/accounts/login/", None, 200),
    ("GET", "/accounts/login/?next=%00", None, 400),
    ("GET", "/accounts/login/?next=%ED%A0%80", None, 200),
    ("GET", "/accounts/login/?next=http://evil.example/", None, 200),
    ("GET", "/accounts/login/?next=//evil.example/", "alice", 200),
    ("GET", "/accounts/signup/", None, 200),
    ("GET", "/accounts/signup/?username=%00", None, 400),
    ("GET", "/accounts/password_change/", "alice", 200),
    ("GET", "/accounts/password_change/", None, 302),
    ("GET", "/accounts/password_change/done/", "alice", 200),
    # The site sends no mail: no password reset.
    ("GET", "/accounts/password_reset/", None, 404),
    ("GET", "/accounts/password_reset/done/", None, 404),
    ("GET", "/accounts/reset/MQ/set-password/", None, 404),
    ("GET", "/accounts/reset/done/", None, 404),
    ("GET", "/rooms/new/", "alice", 405),
    ("GET", "/direct/", "alice", 405),
    ("GET", "/accounts/logout/", "alice", 405),
    ("GET", "/api/push", None, 405),
]


async def test_site_pages_answer_hostile_paths_and_queries(site):
    assert await statuses(site, [case[:-1] for case in SITE_GETS]) == expected(
        SITE_GETS
    )


SITE_POSTS = [
    ("POST", "/accounts/login/", None, b"username=alice%00&password=x", 400),
    ("POST", "/accounts/login/", None, b"username=%ED%A0%80&password=%ED%A0%80", 200),
    ("POST", "/accounts/login/", None, b"username=alice&password=%00", 400),
    ("POST", "/accounts/login/", None, b"\xff\xfe\xfd", 200),
    ("POST", "/accounts/login/", None, b"username=" + b"a" * 100_000, 200),
    ("POST", "/accounts/login/?next=%00", None, b"username=a&password=b", 400),
    ("POST", "/accounts/signup/", None, b"username=a%00b&password1=x&password2=x", 400),
    (
        "POST",
        "/accounts/signup/",
        None,
        b"username=%ED%A0%80&password1=a-long-pass-9876&password2=a-long-pass-9876",
        200,
    ),
    ("POST", "/accounts/signup/", None, b"\xff\xfe\xfd", 200),
    ("POST", "/rooms/new/", "alice", b"slug=%00&title=x", 400),
    ("POST", "/rooms/new/", "alice", b"slug=ok&title=%ED%A0%80", 302),
    ("POST", "/rooms/new/", "alice", b"slug=%ED%A0%80", 200),
    ("POST", "/rooms/new/", "alice", b"slug=" + b"x" * 100_000, 200),
    ("POST", "/rooms/new/", "alice", b"\xff\xfe\xfd", 200),
    ("POST", "/rooms/new/", None, b"slug=ok2", 302),
    ("POST", "/direct/", "alice", b"username=%00", 400),
    ("POST", "/direct/", "alice", b"username=%ED%A0%80", 200),
    ("POST", "/direct/", "alice", b"username=" + b"x" * 100_000, 200),
    (
        "POST",
        "/accounts/password_change/",
        "alice",
        b"old_password=%ED%A0%80&new_password1=x&new_password2=y",
        200,
    ),
    ("POST", "/accounts/password_reset/", None, b"email=root%40example.com", 404),
]


async def test_forms_answer_hostile_fields_and_bodies(site):
    assert await statuses(site, [case[:-1] for case in SITE_POSTS]) == expected(
        SITE_POSTS
    )


WRONG_METHODS = [
    (method, path, "alice", b"", 405)
    for method in ("PUT", "DELETE", "PATCH")
    for path in ("/", "/r/lobby/", "/rooms/new/", "/direct/", "/accounts/signup/")
] + [
    ("POST", "/", "alice", b"", 405),
    ("POST", "/r/lobby/", "alice", b"", 405),
    ("OPTIONS", "/", "alice", 405),
    ("TRACE", "/accounts/login/", None, 405),
    ("BREW", "/accounts/login/", None, b"", 405),
    ("PUT", "/api/push", None, b"", 405),
    ("GET", "/api/push", None, 405),
    ("HEAD", "/", "alice", 200),
    ("HEAD", "/r/lobby/", "alice", 200),
    ("HEAD", "/accounts/signup/", None, 200),
]


async def test_wrong_methods_are_405(site):
    assert await statuses(site, [case[:-1] for case in WRONG_METHODS]) == expected(
        WRONG_METHODS
    )


async def test_a_form_without_the_csrf_token_is_403_on_the_site_s_page(site):
    for path in ("/accounts/login/", "/accounts/signup/", "/rooms/new/", "/direct/"):
        status, headers, body = await http(
            "POST",
            path,
            body=b"slug=x&username=x",
            headers=[cookie(site, "alice"), FORM],
        )

        assert status == 403, path
        assert b"<h1>Form not accepted</h1>" in body
    status, _, _ = await http(
        "POST",
        "/rooms/new/",
        body=b"slug=x",
        headers=[cookie(site, "alice", csrf=False), FORM],
    )
    assert status == 403


# --- the admin ------------------------------------------------------------------

ADMIN = [
    ("GET", "/admin/", None, 302),
    ("GET", "/admin/chat/room/", None, 302),
    ("GET", "/admin/chat/room/", "alice", 302),
    ("GET", "/admin/", "root", 200),
    ("GET", "/admin/?%00", "root", 400),
    ("GET", "/admin/%00/", "root", 400),
    ("GET", "/admin/%ED%A0%80/", "root", 404),
    ("GET", "/admin/chat/room/", "root", 200),
    ("GET", "/admin/chat/room/?p=abc", "root", 200),
    ("GET", "/admin/chat/room/?p=99999999999999999999", "root", 200),
    ("GET", "/admin/chat/room/?p=-1", "root", 200),
    ("GET", "/admin/chat/room/?q=%00", "root", 400),
    ("GET", "/admin/chat/room/?q=%ED%A0%80", "root", 200),
    ("GET", "/admin/chat/room/?o=abc.-9.%ED%A0%80", "root", 200),
    ("GET", "/admin/chat/room/?slug=%00", "root", 400),
    ("GET", "/admin/chat/room/?is_private__exact=%00", "root", 400),
    ("GET", "/admin/chat/room/?is_private__exact=maybe", "root", 302),
    ("GET", "/admin/chat/room/?created_at__year=abc", "root", 302),
    (
        "GET",
        "/admin/chat/room/?created_at__year=2020&created_at__month=13",
        "root",
        302,
    ),
    ("GET", "/admin/chat/room/?created_at__gte=%ED%A0%80", "root", 302),
    ("GET", "/admin/chat/room/?nosuchfield=1", "root", 302),
    ("GET", "/admin/chat/room/?_to_field=%00", "root", 400),
    ("GET", "/admin/chat/room/?_to_field=title", "root", 400),
    ("GET", "/admin/chat/room/{room}/change/", "root", 200),
    (
        "GET",
        "/admin/chat/room/{room}/change/?_changelist_filters=%ED%A0%80",
        "root",
        200,
    ),
    ("GET", "/admin/chat/room/99999999999999999999/change/", "root", 302),
    ("GET", "/admin/chat/room/%ED%A0%80/change/", "root", 302),
    ("GET", "/admin/chat/room/-1/delete/", "root", 302),
    ("GET", "/admin/chat/room/abc/history/", "root", 302),
    ("GET", "/admin/chat/room/add/?slug=%ED%A0%80", "root", 200),
    ("GET", "/admin/chat/room/add/?_popup=%00", "root", 400),
    ("GET", "/admin/chat/message/?room__id__exact=abc", "root", 200),
    ("GET", "/admin/chat/message/?room__id__exact=99999999999999999999", "root", 200),
    ("GET", "/admin/auth/user/?username=%00", "root", 400),
    ("GET", "/admin/auth/user/99999999999999999999/password/", "root", 404),
    ("GET", "/admin/autocomplete/?term=a", "root", 403),
    (
        "GET",
        "/admin/autocomplete/?app_label=%ED%A0%80&model_name=x&field_name=y",
        "root",
        403,
    ),
    (
        "GET",
        "/admin/autocomplete/?app_label=chat&model_name=membership&field_name=user"
        "&term=%00",
        "root",
        400,
    ),
    (
        "GET",
        "/admin/autocomplete/?app_label=chat&model_name=membership&field_name=user"
        "&term=a&page=99999999999",
        "root",
        404,
    ),
    ("GET", "/admin/jsi18n/", "root", 200),
    ("GET", "/admin/r/%00/%00/", "root", 400),
    ("GET", "/admin/r/99999999999999999999/1/", "root", 404),
    ("GET", "/admin/r/abc/1/", "root", 404),
    ("GET", "/admin/chat/room/live/", "root", 200),
    ("GET", "/admin/chat/room/live/?%ED%A0%80", "root", 200),
    ("GET", "/admin/axes/accessattempt/?q=%ED%A0%80", "root", 200),
    ("GET", "/admin/login/?next=%00", None, 400),
    ("POST", "/admin/login/", None, b"username=%00&password=x", 400),
    ("POST", "/admin/login/", None, b"username=%ED%A0%80&password=x", 200),
    ("POST", "/admin/chat/room/add/", "root", b"slug=%00&title=x", 400),
    ("POST", "/admin/chat/room/add/", "root", b"slug=%ED%A0%80&title=x", 200),
    ("POST", "/admin/chat/room/", "root", b"action=%00&_selected_action=1", 400),
    ("POST", "/admin/chat/room/", "root", b"action=nope&_selected_action=abc", 302),
    ("POST", "/admin/chat/room/live/", "root", b"connection_id=%00", 400),
    ("POST", "/admin/chat/room/live/", "root", b"connection_id=nope-1", 302),
]


async def test_the_admin_answers_hostile_input(site):
    table = [
        (case[0], case[1].replace("{room}", str(site["room"])), *case[2:])
        for case in ADMIN
    ]
    assert await statuses(site, [case[:-1] for case in table]) == expected(table)


# --- static files ---------------------------------------------------------------

STATIC = [
    ("GET", "/static/chat/chat.js", None, 200),
    ("GET", "/static/chat/chat.js?%00", None, 200),
    ("GET", "/static/%00", None, 404),
    ("GET", "/static/chat/chat.js%00", None, 404),
    ("GET", "/static/chat/%ED%A0%80.js", None, 404),
    ("GET", "/static/", None, 404),
    ("GET", "/static/chat/%2e%2e/%2e%2e/manage.py", None, 404),
    ("GET", "/static/admin/css/base.css", None, 200),
]


async def test_static_files_answer_hostile_paths(site):
    assert await statuses(site, [case[:-1] for case in STATIC]) == expected(STATIC)


# --- the push API -----------------------------------------------------------------


def push_cases(site):
    bearer = (b"authorization", f"Bearer {site['key']}".encode())
    json_type = (b"content-type", b"application/json")
    bodies = {
        b"": 400,
        b"\xff\xfe\xfd": 400,
        b"[]": 400,
        b'{"event":"e","data":1,"user":"\\u0000"}': 400,
        b'{"event":"e","data":1,"room":"\\u0000"}': 400,
        b'{"event":"e","data":1,"connection_id":"\\u0000"}': 400,
        b'{"event":"e","data":1,"user":"\\ud800"}': 400,
        b'{"event":"e","data":"\\ud800","all":true}': 400,
        b'{"event":"e","data":1,"user":"nobody"}': 400,
        b'{"event":"e","data":1,"room":"nowhere"}': 400,
        b'{"event":"e","data":1,"all":true}': 202,
    }
    cases = [
        ("POST", "/api/push", None, body, (bearer, json_type), status)
        for body, status in bodies.items()
    ]
    form = (b"content-type", b"application/x-www-form-urlencoded")
    multipart = (b"content-type", b"multipart/form-data; boundary=zz")
    parts = b'--zz\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--zz--\r\n'
    cases += [
        ("POST", "/api/push", None, b"a=%00", (bearer, form), 400),
        ("POST", "/api/push", None, b"event=e&data=1", (bearer, form), 400),
        ("POST", "/api/push", None, parts, (bearer, multipart), 400),
        ("POST", "/api/push", None, b"{}", ((b"authorization", b"Bearer %00"),), 401),
        ("POST", "/api/push", None, b"{}", ((b"authorization", b"Bearer\x00"),), 400),
        ("POST", "/api/push", None, b"{}", ((b"authorization", b"\xed\xa0\x80"),), 401),
    ]
    return cases


async def test_the_push_api_answers_hostile_bodies(site):
    table = push_cases(site)
    assert await statuses(site, [case[:-1] for case in table]) == expected(table)


# --- headers and bodies Django decodes ------------------------------------------


def raw_cases():
    def sign_in(*headers):
        body = f"csrfmiddlewaretoken={CSRF}&username=alice&password=wrong".encode()
        return ("POST", "/accounts/login/", None, body, headers)

    def typed(content_type):
        return sign_in((b"content-type", content_type))

    def get(*headers):
        return ("GET", "/", None, b"", headers)

    return [
        (*get((b"cookie", b"sessionid=aaaaaaaa\x00bbbbbbbb")), 400),
        (*get((b"cookie", b"sessionid=\xed\xa0\x80aaaaaaaa")), 302),
        (*get((b"cookie", b"sessionid=" + b"a" * 5000)), 302),
        (*get((b"user-agent", b"x\x00y")), 400),
        (*get((b"host", b"evil.example")), 400),
        (*get((b"host", b"\x00")), 400),
        (*get((b"host", b"testserver:99999")), 400),
        (*sign_in((b"user-agent", b"x\x00y"), FORM), 400),
        (*sign_in((b"user-agent", b"\xed\xa0\x80"), FORM), 200),
        (*typed(b"application/x-www-form-urlencoded; charset=utf-16"), 400),
        (*typed(b"application/x-www-form-urlencoded; charset=nope"), 200),
        (*typed(b"multipart/form-data"), 400),
        (*typed(b"multipart/form-data; boundary=\x00"), 400),
        (*typed(b"text/plain"), 200),  # no form data: the sign-in form's errors
    ]


async def test_headers_and_bodies_django_cannot_take_are_400(site):
    table = raw_cases()
    assert await statuses(site, [case[:-1] for case in table]) == expected(table)


async def test_a_nul_gets_the_site_s_400_page_under_the_policy(site):
    status, headers, body = await http(
        "GET", "/?q=%00", headers=[cookie(site, "alice")]
    )

    assert status == 400
    assert b"<h1>Bad request</h1>" in body
    assert b"connect-src 'self' ws://testserver" in headers[b"content-security-policy"]


async def test_a_form_body_django_cannot_decode_gets_the_400_page(site):
    # Django's own 400 handler checks CSRF, reads the body again, and fails again:
    # the exception would leave the application, and daphne would answer 500.
    status, _, body = await http(
        "POST",
        "/accounts/login/",
        body="username=alice".encode("utf-16"),
        headers=[
            cookie(site, None),
            (b"x-csrftoken", CSRF.encode()),
            (b"content-type", b"application/x-www-form-urlencoded; charset=utf-16"),
        ],
    )

    assert status == 400
    assert b"<h1>Bad request</h1>" in body
