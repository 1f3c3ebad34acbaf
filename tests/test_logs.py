"""Log lines: the JSON and plain formats, the connection context and the request log."""

import asyncio
import contextvars
import json
import logging
import re
import sys
import traceback

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.http import HttpResponse
from django.test import AsyncClient, AsyncRequestFactory, Client

from chat import logs
from tests.test_settings import PRODUCTION, manage

# 2026-12-03 12:13:20.250 UTC
CREATED = 1796300000.25


def record(msg="hello %s", args=("world",), exc_info=None):
    made = logging.LogRecord(
        "chat.consumers", logging.WARNING, __file__, 10, msg, args, exc_info
    )
    made.created = CREATED
    return made


def in_fresh_context(function, *args):
    """Run ``function`` in a context of its own: a binding in it stays there."""
    return contextvars.Context().run(function, *args)


def bound_record(connection_id, user, **fields):
    def make():
        logs.bind_connection(connection_id, user)
        made = record(**fields)
        assert logs.ConnectionFilter().filter(made) is True
        return made

    return in_fresh_context(make)


def raised():
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        return sys.exc_info()


def test_a_json_line_without_a_connection_has_the_four_keys():
    made = record()
    assert logs.ConnectionFilter().filter(made) is True

    line = logs.JSONFormatter().format(made)

    assert json.loads(line) == {
        "time": "2026-12-03T12:13:20.250Z",
        "level": "WARNING",
        "logger": "chat.consumers",
        "message": "hello world",
    }
    assert "\n" not in line


def test_a_json_line_logged_for_a_bound_connection_names_it_and_its_user():
    made = bound_record("p1-7", "alice")

    assert json.loads(logs.JSONFormatter().format(made)) == {
        "time": "2026-12-03T12:13:20.250Z",
        "level": "WARNING",
        "logger": "chat.consumers",
        "message": "hello world",
        "connection_id": "p1-7",
        "user": "alice",
    }


def test_a_json_line_with_an_exception_carries_its_traceback_on_one_line():
    exc_info = raised()
    made = bound_record("p1-8", "bob", msg="frame from %s failed", args=("p1-8",))
    made.exc_info = exc_info

    line = logs.JSONFormatter().format(made)
    fields = json.loads(line)

    assert "\n" not in line
    assert fields == {
        "time": "2026-12-03T12:13:20.250Z",
        "level": "WARNING",
        "logger": "chat.consumers",
        "message": "frame from p1-8 failed",
        "connection_id": "p1-8",
        "user": "bob",
        "exc": "".join(traceback.format_exception(*exc_info)).rstrip("\n"),
    }
    assert fields["exc"].startswith("Traceback (most recent call last):\n")
    assert fields["exc"].endswith("\nZeroDivisionError: division by zero")


def test_json_keys_given_as_extra_are_kept_and_the_four_keys_win():
    made = record()
    made.room = "lobby"
    made.level = "not the level"

    assert json.loads(logs.JSONFormatter().format(made)) == {
        "time": "2026-12-03T12:13:20.250Z",
        "level": "WARNING",
        "logger": "chat.consumers",
        "message": "hello world",
        "room": "lobby",
    }


def test_a_plain_line_is_the_message_with_the_connection_as_a_suffix():
    formatter = logs.PlainFormatter()

    assert formatter.format(record()) == "hello world"
    assert formatter.format(bound_record("p1-9", "carol")) == (
        "hello world [conn=p1-9 user=carol]"
    )


def test_a_plain_line_puts_the_suffix_before_the_traceback():
    made = bound_record("p1-9", "carol")
    made.exc_info = raised()

    first, second, *_, last = logs.PlainFormatter().format(made).splitlines()

    assert (first, second, last) == (
        "hello world [conn=p1-9 user=carol]",
        "Traceback (most recent call last):",
        "ZeroDivisionError: division by zero",
    )


def test_unbinding_stops_naming_the_connection():
    def bind_then_unbind():
        logs.bind_connection("p1-1", "alice")
        logs.unbind_connection()
        made = record()
        logs.ConnectionFilter().filter(made)
        return made

    made = in_fresh_context(bind_then_unbind)

    assert (hasattr(made, "connection_id"), hasattr(made, "user")) == (False, False)


async def test_tasks_and_threads_started_from_a_bound_context_carry_it():
    def connection_of_a_new_record():
        made = record()
        logs.ConnectionFilter().filter(made)
        return getattr(made, "connection_id", None), getattr(made, "user", None)

    async def in_a_task():
        return connection_of_a_new_record()

    async def handle_a_connection():
        logs.bind_connection("p2-3", "dave")
        loop = asyncio.get_running_loop()
        return (
            await loop.create_task(in_a_task()),
            await sync_to_async(connection_of_a_new_record)(),
            await loop.create_task(
                in_a_task(), context=logs.context_without_connection()
            ),
        )

    results = await asyncio.get_running_loop().create_task(
        handle_a_connection(), context=contextvars.Context()
    )

    assert results == (("p2-3", "dave"), ("p2-3", "dave"), (None, None))
    assert connection_of_a_new_record() == (None, None)


@pytest.fixture
def request_lines():
    """The records of the "chat.requests" logger while the test runs."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("chat.requests")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def request_fields(made):
    return {
        key: getattr(made, key)
        for key in ("method", "path", "status", "user_id", "levelname", "name")
    }


LINE = re.compile(r"(\S+) (\S+) (\d{3}) (\d+\.\d)ms user=(\S+)")


def test_a_request_gets_one_line_with_method_path_status_and_duration(
    db, request_lines
):
    response = Client().get("/accounts/login/?next=/secret")

    (made,) = request_lines
    assert response.status_code == 200
    assert request_fields(made) == {
        "method": "GET",
        "path": "/accounts/login/",
        "status": 200,
        "user_id": None,
        "levelname": "INFO",
        "name": "chat.requests",
    }
    assert isinstance(made.duration_ms, float) and made.duration_ms >= 0
    method, path, status, duration, user = LINE.fullmatch(made.getMessage()).groups()
    assert (method, path, status, float(duration), user) == (
        "GET",
        "/accounts/login/",
        "200",
        made.duration_ms,
        "-",
    )


def test_a_signed_in_request_names_the_user_id(make_user, request_lines):
    user = make_user("erin")
    client = Client()
    client.force_login(user)

    response = client.post("/no-such-page/")

    (made,) = request_lines
    assert (response.status_code, request_fields(made)) == (
        404,
        {
            "method": "POST",
            "path": "/no-such-page/",
            "status": 404,
            "user_id": user.pk,
            "levelname": "INFO",
            "name": "chat.requests",
        },
    )
    assert made.getMessage().endswith(f"ms user={user.pk}")


def test_a_path_with_a_line_break_stays_on_one_line(db, request_lines):
    Client().get("/a%0Ab/")

    (made,) = request_lines
    assert (made.path, made.status) == ("/a%0Ab/", 404)
    assert made.getMessage().startswith("GET /a%0Ab/ 404 ")


async def test_a_request_through_the_asgi_handler_is_logged_the_same_way(
    transactional_db, request_lines
):
    user = await get_user_model().objects.acreate(username="frank")
    client = AsyncClient()
    await client.aforce_login(user)

    response = await client.get("/accounts/login/")

    (made,) = request_lines
    assert (response.status_code, request_fields(made)) == (
        200,
        {
            "method": "GET",
            "path": "/accounts/login/",
            "status": 200,
            "user_id": user.pk,
            "levelname": "INFO",
            "name": "chat.requests",
        },
    )


def test_with_chat_log_format_json_every_line_on_stderr_is_one_json_object():
    code = (
        "import logging; from chat import logs; from django.test import Client; "
        "logging.getLogger('chat.consumers').warning('before %s', 'binding'); "
        "logs.bind_connection('p3-1', 'gina'); "
        "logging.getLogger('chat.consumers').warning('after'); "
        "Client().get('/accounts/login/', HTTP_HOST='chat.example.com')"
    )
    done = manage(
        "shell", "--no-imports", "-c", code, **PRODUCTION, CHAT_LOG_FORMAT="json"
    )

    lines = [json.loads(line) for line in done.stderr.splitlines()]
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("time"))
    duration = lines[-1].pop("duration_ms")
    assert isinstance(duration, float)
    assert (done.returncode, lines) == (
        0,
        [
            {
                "level": "WARNING",
                "logger": "chat.consumers",
                "message": "before binding",
            },
            {
                "level": "WARNING",
                "logger": "chat.consumers",
                "message": "after",
                "connection_id": "p3-1",
                "user": "gina",
            },
            {
                # Behind the TLS proxy, plain HTTP is redirected: that is logged too.
                "level": "INFO",
                "logger": "chat.requests",
                "message": f"GET /accounts/login/ 301 {duration:.1f}ms user=-",
                "method": "GET",
                "path": "/accounts/login/",
                "status": 301,
                "user_id": None,
                "connection_id": "p3-1",
                "user": "gina",
            },
        ],
    )


def test_by_default_lines_on_stderr_are_plain_with_the_connection_suffix():
    code = (
        "import logging; from chat import logs; "
        "logging.getLogger('chat.consumers').warning('before'); "
        "logs.bind_connection('p3-2', 'hank'); "
        "logging.getLogger('chat.consumers').warning('after')"
    )
    done = manage("shell", "--no-imports", "-c", code, **PRODUCTION)

    assert (done.returncode, done.stderr.splitlines()) == (
        0,
        ["before", "after [conn=p3-2 user=hank]"],
    )


async def test_in_an_async_chain_the_middleware_awaits_and_asks_auser(request_lines):
    class SignedIn:
        pk = 41
        is_authenticated = True

    async def view(request):
        return HttpResponse(status=201)

    async def auser():
        return SignedIn()

    middleware = logs.RequestLogMiddleware(view)
    request = AsyncRequestFactory().put("/api/thing")
    request.auser = auser

    response = await middleware(request)

    (made,) = request_lines
    assert (middleware.is_async, response.status_code, request_fields(made)) == (
        True,
        201,
        {
            "method": "PUT",
            "path": "/api/thing",
            "status": 201,
            "user_id": 41,
            "levelname": "INFO",
            "name": "chat.requests",
        },
    )
