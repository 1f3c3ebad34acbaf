"""Moderation, server push and device keys across server processes.

The module starts its own redis-server and two daphne processes (A and B) on
the test database, and points this process's channel layer and presence at the
same Redis. Moderation goes through the real admin: Django's test client, logged
in as a superuser, posts the admin's forms and actions in a thread, as sync code
runs; its after-commit effects go out through Redis. Push goes through
``chat.push``, the ``chat_push`` command and ``POST /api/push``. Every effect is
observed on real WebSocket connections held by A and B, never by this process.
"""

import asyncio
import itertools
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from io import StringIO
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.forms import MultiWidget
from django.test import Client as HttpClient
from django.urls import reverse
from django.utils import timezone
from pytest_django.asserts import assertContains
from websockets.exceptions import ConnectionClosed

from chat import protocol, push, registry, services
from chat.client import ChatClient, ChatClosed, ChatRefused
from chat.models import ApiToken, Ban, Membership, Message, ModerationAction, Mute, Room
from tests.clients import process_of
from tests.servers import (
    ROOT,
    SECRET_KEY,
    RedisServer,
    database_url,
    this_process_uses_redis,
)
from tests.test_multiprocess import (
    HEARTBEAT,
    TIMEOUT,
    daphne_start,
    joined_frame,
    key_for,
    room_create,
    stored_message,
    user_with_key,
)
from tests.test_multiprocess import presence as presence_frame
from tests.waiting import until

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

WITHIN = 2.0  # seconds: the bound for a moderation effect on live sockets
PASSWORD = "a-long-pass-9876"
# protocol.timestamp: ISO 8601 in UTC to the millisecond, with a Z.
TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z"
)
db = database_sync_to_async


# --- servers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(django_db_setup, django_db_blocker):
    """redis-server, daphne A and B, and this process on the same Redis."""
    redis = RedisServer().start()
    servers = []
    try:
        for _ in range(2):
            servers.append(daphne_start(redis, django_db_blocker))
        with this_process_uses_redis(redis.url, heartbeat=HEARTBEAT):
            yield SimpleNamespace(redis=redis, a=servers[0], b=servers[1])
    finally:
        for server in servers:
            server.stop()
        redis.stop()


@pytest.fixture(autouse=True)
def daphne_logs(cluster):
    """Check A and B outlive each test; print what they logged during it."""
    pair = [cluster.a, cluster.b]
    starts = [len(server.output()) for server in pair]
    yield
    for name, server, start in zip("AB", pair, starts, strict=True):
        print(f"--- daphne {name} log during the test ---\n{server.output()[start:]}")
    for name, server in zip("AB", pair, strict=True):
        assert server.alive(), f"daphne {name} died:\n{server.output()}"


@pytest.fixture
def server_a(cluster):
    return cluster.a


@pytest.fixture
def server_b(cluster):
    return cluster.b


# --- clients -----------------------------------------------------------------------

QUIET = 0.4  # seconds of silence that show a frame does not come
_pings = itertools.count(1)


@pytest.fixture
async def open_socket(cluster, chat_client):
    """``await open_socket(server, name, key=…, device=…, headers=…)`` → a connected
    ``ChatClient`` (read in order, a keep-alive ping every half heartbeat), closed
    after the test."""

    async def open_(server, name, *, key=None, **options):
        return await chat_client(server, key, name=name, **options)

    return open_


async def alive(client):
    """Assert the socket is open and served: a ping gets its pong."""
    ref = f"alive-{next(_pings)}"
    try:
        try:
            await client.send({"type": "ping", "ref": ref})
        except ConnectionClosed:
            pass  # the socket's end comes next, with its close code
        pong = await client.next_frame()
    except ChatClosed as closed:
        raise AssertionError(f"{client.name}: {closed}") from None
    assert pong == {"type": "pong", "ref": ref}, client.name


async def request(client, frame):
    """Send ``frame`` as it is (its own ref); answer the next frame that comes."""
    await client.send(frame)
    return await client.next_frame()


async def join(client, room, *, skip=(), **extra):
    """Send a join (``extra``: ref, since…); answer the ``joined`` frame, passing
    over frames of types in ``skip``."""
    await client.send({"type": "join", "room": room, **extra})
    return await client.expect("joined", skip=skip)


async def room_history(client, room):
    frame = await request(client, {"type": "history", "room": room, "ref": "h"})
    assert frame["type"] == "history", frame
    return frame["messages"]


async def handshake_status(server, *, key=None, headers=None):
    """The HTTP status of a WebSocket handshake: 101 when it opens."""
    client = ChatClient(
        server.ws_url, token=key, headers=headers, reconnect=False, keepalive=False
    )
    try:
        await client.connect()
    except ChatRefused as refused:
        return refused.status
    except ChatClosed:
        return 101  # it opened, then closed before its hello
    await client.close()
    return 101


async def closes_within(clients, started, expected, *, seconds=WITHIN, skip=()):
    """Each client's socket closes with ``expected`` (code, reason) in time."""
    remaining = started + seconds - time.monotonic()
    results = await asyncio.gather(
        *(c.expect_close(timeout=max(remaining, 0.05), skip=skip) for c in clients)
    )
    elapsed = time.monotonic() - started
    assert results == [expected] * len(clients), [c.name for c in clients]
    assert elapsed <= seconds, f"closed after {elapsed:.2f}s"


async def expect_within(client, started, frame_type, *, seconds=WITHIN, skip=()):
    remaining = max(started + seconds - time.monotonic(), 0.05)
    return await client.expect(frame_type, skip=skip, timeout=remaining)


# --- the admin ---------------------------------------------------------------------


class Admin:
    """The real admin views, through Django's test client as a superuser.

    Sync Django code runs in a thread; the services' after-commit broadcasts run
    there too and reach Redis.
    """

    def __init__(self, client, user):
        self.client = client
        self.user = user

    async def get(self, name, *args, **params):
        return await db(self.client.get)(reverse(name, args=args), params)

    async def post(self, name, *args, data):
        return await db(self.client.post)(reverse(name, args=args), data)

    async def add(self, model, **fields):
        """Submit ``model``'s add form (checked against the GET form first)."""
        name = f"admin:chat_{model}_add"
        form = (await self.get(name)).content.decode()
        for field in fields:
            assert f'name="{field}"' in form, f"no field {field!r} on the {model} form"
        response = await self.post(name, data={**fields, "_save": "Save"})
        assert_saved(response)
        return response

    async def delete(self, model, pk):
        """Confirm the delete view of one object, as the admin's button does."""
        name = f"admin:chat_{model}_delete"
        response = await self.post(name, pk, data={"post": "yes"})
        assert response.status_code == 302, response.content.decode()[-3000:]
        return response

    async def action(self, changelist, action, pks, **extra):
        data = {"action": action, "_selected_action": list(pks), "index": 0, **extra}
        response = await self.post(changelist, data=data)
        assert response.status_code == 302, response.content.decode()[-3000:]
        return response

    async def change(self, model, pk, **changes):
        """Submit the change form as shown, with ``changes`` (False unchecks)."""
        name = f"admin:chat_{model}_change"
        shown = await self.get(name, pk)
        data = change_form_data(shown)
        for field, value in changes.items():
            if value is False:
                data.pop(field, None)
            else:
                data[field] = "on" if value is True else value
        response = await self.post(name, pk, data={**data, "_save": "Save"})
        assert_saved(response)
        return response


def assert_saved(response):
    if response.status_code == 302:
        return
    errors = []
    context = response.context or {}
    if "adminform" in context:
        errors.append(context["adminform"].form.errors)
    for inline in context.get("inline_admin_formsets", []):
        errors.append(inline.formset.errors)
    pytest.fail(f"the admin did not save ({response.status_code}): {errors}")


def _form_values(form, data):
    for name, field in form.fields.items():
        assert not isinstance(field.widget, MultiWidget), name
        bound = form[name]
        value = bound.value()
        if value is None or value is False:
            continue
        data[bound.html_name] = "on" if value is True else value


def change_form_data(response):
    """The POST data of an admin change form as it was shown, inlines included."""
    assert response.status_code == 200
    data = {}
    _form_values(response.context["adminform"].form, data)
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        _form_values(formset.management_form, data)
        for form in formset.forms:
            _form_values(form, data)
    return data


def _admin_for_tests():
    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = HttpClient()
    client.force_login(root)
    return Admin(client, root)


@pytest.fixture
async def admin(cluster):
    return await db(_admin_for_tests)()


# --- data --------------------------------------------------------------------------


@db
def user_with_password(username):
    return get_user_model().objects.create_user(username=username, password=PASSWORD)


@db
def session_cookie(username):
    """Log ``username`` in as a browser would; the Cookie header of that session."""
    browser = HttpClient()
    assert browser.login(username=username, password=PASSWORD)
    return f"sessionid={browser.cookies['sessionid'].value}"


def browser_headers(server, cookie):
    return {"Cookie": cookie, "Origin": server.http_url}


@db
def token_of(key):
    return ApiToken.objects.get(key_hash=ApiToken.hash_key(key))


@db
def messages_create(slug, username, bodies):
    room = Room.objects.get(slug=slug)
    author = get_user_model().objects.get(username=username)
    return [
        services.message_create(
            room=room, author=author, body=body, client_msg_id=f"{slug}-{n}"
        )[0]
        for n, body in enumerate(bodies, 1)
    ]


@db
def moderation_log():
    """Every recorded moderation action, oldest first, as plain values."""
    rows = ModerationAction.objects.select_related(
        "actor", "target_user", "room"
    ).order_by("created_at", "pk")
    return [
        {
            "kind": row.kind,
            "actor": row.actor.username if row.actor else None,
            "target": row.target_user.username if row.target_user else None,
            "room": row.room.slug if row.room else None,
            "message": row.message_id,
            "reason": row.reason,
            "detail": row.detail,
        }
        for row in rows
    ]


@db
def admin_log(model):
    """The admin's own change history of ``model``: (flag, object id, user, text)."""
    content_type = ContentType.objects.get_for_model(model)
    entries = LogEntry.objects.filter(content_type=content_type).order_by("pk")
    return [
        (e.action_flag, e.object_id, e.user.username, e.get_change_message())
        for e in entries
    ]


def send_frame(room, body, msg_id):
    return {
        "type": "send",
        "room": room,
        "body": body,
        "client_msg_id": msg_id,
        "ref": msg_id,
    }


async def ack_and_echo(socket, echo, **frame):
    """Send ``frame``; return its ack and the room's copy (``echo`` frame type).

    Both come back to the sender, in either order; presence frames may mix in.
    """
    await socket.send(frame)
    got = {}
    while len(got) < 2:
        reply = await socket.expect(("ack", echo), skip=("presence",))
        assert reply["type"] not in got, reply
        got[reply["type"]] = reply
    assert got["ack"]["ref"] == frame["ref"], got
    return got["ack"], got[echo]


def ack_of(message, ref):
    """The ack of ``message`` (a ``message`` frame) to the send with ``ref``."""
    return {
        "type": "ack",
        "ref": ref,
        "room": message["room"],
        "client_msg_id": message["client_msg_id"],
        "id": message["id"],
        "seq": message["seq"],
    }


async def send_and_ack(socket, room, body, msg_id):
    """Send; check the ack and the sender's copy; return the stored ``message``."""
    ack, message = await ack_and_echo(
        socket, "message", **send_frame(room, body, msg_id)
    )
    stored = await stored_message(room, ack["seq"])
    assert (stored["body"], stored["client_msg_id"]) == (body, msg_id)
    assert message == stored
    assert ack == ack_of(stored, msg_id)
    return stored


def admin_datetime(value):
    """The admin's split date/time inputs for ``value`` (whole seconds, UTC)."""
    local = timezone.localtime(value)
    return {
        "expires_at_0": local.strftime("%Y-%m-%d"),
        "expires_at_1": local.strftime("%H:%M:%S"),
    }


NO_EXPIRY = {"expires_at_0": "", "expires_at_1": ""}


# --- site ban ----------------------------------------------------------------------


async def test_site_ban_in_the_admin_closes_the_users_sockets_on_both_processes(
    server_a, server_b, admin, open_socket
):
    bob, bob_key = await user_with_key("bob")
    _, carol_key = await user_with_key("carol")
    bob_a = await open_socket(server_a, "bob@A", key=bob_key)
    bob_b = await open_socket(server_b, "bob@B", key=bob_key)
    carol_b = await open_socket(server_b, "carol@B", key=carol_key)

    started = time.monotonic()
    await admin.add("ban", user=bob.pk, room="", reason="spamming", **NO_EXPIRY)

    await closes_within([bob_a, bob_b], started, (4403, "banned: spamming"))
    await alive(carol_b)
    assert await handshake_status(server_a, key=bob_key) == 403
    assert await handshake_status(server_b, key=bob_key) == 403

    [ban] = await db(lambda: list(Ban.objects.values()))()
    assert (ban["user_id"], ban["room_id"], ban["reason"]) == (bob.pk, None, "spamming")
    assert (ban["expires_at"], ban["created_by_id"]) == (None, admin.user.pk)
    assert await moderation_log() == [
        {
            "kind": "ban",
            "actor": "root",
            "target": "bob",
            "room": None,
            "message": None,
            "reason": "spamming",
            "detail": "no end",
        }
    ]
    assert await admin_log(Ban) == [(ADDITION, str(ban["id"]), "root", "Added.")]
    listed = await admin.get("admin:chat_moderationaction_changelist")
    assert [a.reason for a in listed.context["cl"].result_list] == ["spamming"]
    # The row's kind (the filter in the sidebar names every kind anyway).
    assertContains(listed, '<td class="field-kind">Site ban</td>', count=1, html=True)

    # Lifting the ban (the admin's delete) lets bob in again, on either process.
    await admin.delete("ban", ban["id"])
    assert await db(Ban.objects.count)() == 0
    assert (await moderation_log())[1:] == [
        {
            "kind": "unban",
            "actor": "root",
            "target": "bob",
            "room": None,
            "message": None,
            "reason": "",
            "detail": "",
        }
    ]
    assert await admin_log(Ban) == [
        (ADDITION, str(ban["id"]), "root", "Added."),
        (DELETION, str(ban["id"]), "root", ""),
    ]
    for name, server in (("B", server_b), ("A", server_a)):
        again = await open_socket(server, f"bob@{name} again", key=bob_key)
        assert again.hello == {
            "type": "hello",
            "protocol": 1,
            "connection_id": again.hello["connection_id"],
            "user": {"id": bob.pk, "username": "bob"},
            "heartbeat": HEARTBEAT,
        }


async def test_a_ban_refuses_handshakes_until_it_expires(
    server_a, server_b, admin, open_socket
):
    bob, bob_key = await user_with_key("bob")
    bob_a = await open_socket(server_a, "bob@A", key=bob_key)

    # The form takes whole seconds: this ban ends 3 to 4 seconds from now.
    ends = timezone.now() + timedelta(seconds=4)
    started = time.monotonic()
    await admin.add(
        "ban", user=bob.pk, room="", reason="cool off", **admin_datetime(ends)
    )
    await closes_within([bob_a], started, (4403, "banned: cool off"))
    assert await handshake_status(server_b, key=bob_key) == 403

    expires_at = await db(lambda: Ban.objects.get().expires_at)()
    assert expires_at == ends.replace(microsecond=0)

    async def handshake():
        """The status of a handshake of bob's, and when it was answered."""
        tried_at = timezone.now()
        status = await handshake_status(server_b, key=bob_key)
        # The server asked its clock (this machine's) between the two readings.
        if status == 403:
            assert tried_at < expires_at, f"refused at {tried_at}, after the ban"
        return status, timezone.now()

    status, answered_at = await until(
        handshake,
        lambda answer: answer[0] != 403,
        timeout=(expires_at - timezone.now()).total_seconds() + TIMEOUT,
        what="bob's handshake",
        interval=0.1,
    )
    assert status == 101
    assert answered_at >= expires_at, f"let in at {answered_at}, during the ban"
    await open_socket(server_b, "bob@B after the ban", key=bob_key)
    await open_socket(server_a, "bob@A after the ban", key=bob_key)


async def test_a_ban_that_already_ended_refuses_nothing(
    server_a, server_b, admin, open_socket
):
    bob, bob_key = await user_with_key("bob")
    bob_b = await open_socket(server_b, "bob@B", key=bob_key)

    past = timezone.now() - timedelta(hours=1)
    await admin.add("ban", user=bob.pk, room="", reason="old", **admin_datetime(past))

    assert await db(Ban.objects.count)() == 1
    await open_socket(server_a, "bob@A", key=bob_key)
    assert await handshake_status(server_b, key=bob_key) == 101
    # A ban that is over must not throw out the sockets it no longer refuses.
    try:
        await alive(bob_b)
        closed = None
    except AssertionError as exc:
        closed = str(exc).splitlines()[0]
    if closed is not None:
        pytest.fail(
            "BUG chat/services.py user_ban: a ban whose expires_at is already past "
            f"closed bob's open socket with 4403 although it refuses nothing: {closed}"
        )


# --- tokens and sessions -----------------------------------------------------------


async def test_token_revoke_action_closes_only_the_sockets_opened_with_that_token(
    server_a, server_b, admin, open_socket
):
    bob, revoked_key = await user_with_key("bob")
    kept_key = await key_for(bob)
    token = await token_of(revoked_key)
    doomed = [
        await open_socket(server_a, "bob@A token 1", key=revoked_key),
        await open_socket(server_b, "bob@B token 1", key=revoked_key),
    ]
    kept = await open_socket(server_b, "bob@B token 2", key=kept_key)

    started = time.monotonic()
    await admin.action("admin:chat_apitoken_changelist", "revoke_tokens", [token.pk])

    await closes_within(doomed, started, (4403, "token revoked"))
    await alive(kept)
    assert await handshake_status(server_a, key=revoked_key) == 403
    await open_socket(server_a, "bob@A token 2", key=kept_key)
    [row] = await moderation_log()
    assert row == {
        "kind": "token_revoke",
        "actor": "root",
        "target": "bob",
        "room": None,
        "message": None,
        "reason": "",
        "detail": f"token {token.hint}",
    }
    assert await admin_log(ApiToken) == [
        (CHANGE, str(token.pk), "root", "Revoked the token.")
    ]
    history = await admin.get("admin:chat_apitoken_history", token.pk)
    assertContains(history, "Revoked the token.", count=1)


async def test_sign_out_everywhere_closes_the_sockets_opened_with_a_session(
    server_a, server_b, admin, open_socket
):
    bob = await user_with_password("bob")
    bob_key = await key_for(bob)
    cookie = await session_cookie("bob")
    by_session = [
        await open_socket(
            server, f"bob@{name} session", headers=browser_headers(server, cookie)
        )
        for name, server in (("A", server_a), ("B", server_b))
    ]
    assert by_session[0].hello["user"] == {"id": bob.pk, "username": "bob"}
    by_token = await open_socket(server_a, "bob@A token", key=bob_key)

    started = time.monotonic()
    await admin.action("admin:auth_user_changelist", "sign_out_everywhere", [bob.pk])

    await closes_within(by_session, started, (4403, "signed out"))
    await alive(by_token)
    headers = browser_headers(server_b, cookie)
    assert await handshake_status(server_b, headers=headers) == 403
    [row] = await moderation_log()
    assert (row["kind"], row["actor"], row["target"]) == ("sign_out", "root", "bob")
    assert row["detail"] == "1 session(s)"
    assert await admin_log(get_user_model()) == [
        (CHANGE, str(bob.pk), "root", "Signed out of 1 session(s).")
    ]
    # The admin's own session was not bob's: it still works.
    assert (await admin.get("admin:index")).status_code == 200

    # The user action that revokes all of bob's tokens takes the token socket.
    started = time.monotonic()
    await admin.action("admin:auth_user_changelist", "revoke_all_tokens", [bob.pk])
    await closes_within([by_token], started, (4403, "token revoked"))
    assert await handshake_status(server_a, key=bob_key) == 403


# --- room ban and mute -------------------------------------------------------------


async def test_room_ban_removes_the_user_from_that_room_only_and_refuses_joins(
    server_a, server_b, admin, open_socket
):
    bob, bob_key = await user_with_key("bob")
    _, alice_key = await user_with_key("alice")
    den = await room_create("den")
    await room_create("yard")
    alice_a = await open_socket(server_a, "alice@A", key=alice_key)
    await join(alice_a, "den")
    bob_b = await open_socket(server_b, "bob@B", key=bob_key)
    await join(bob_b, "den")
    assert await alice_a.next_frame() == presence_frame("den", "bob", "online")
    await join(bob_b, "yard")
    bob_a = await open_socket(server_a, "bob@A", key=bob_key)
    await join(bob_a, "yard")

    started = time.monotonic()
    await admin.add("ban", user=bob.pk, room=den.pk, reason="trolling", **NO_EXPIRY)

    removed = await expect_within(bob_b, started, "removed")
    assert removed == {
        "type": "removed",
        "room": "den",
        "reason": "banned from the room: trolling",
    }
    assert await alice_a.next_frame() == presence_frame("den", "bob", "offline")
    for socket in (bob_a, bob_b):
        refused = await request(socket, {"type": "join", "room": "den", "ref": "j"})
        assert refused == {
            "type": "error",
            "code": "forbidden",
            "message": "you are banned from 'den': trolling",
            "ref": "j",
        }
    # bob's other room, and his socket on A, are untouched.
    sent = await send_and_ack(bob_b, "yard", "still here", "y1")
    assert await bob_a.expect("message") == sent
    assert await request(bob_b, send_frame("den", "let me in", "d1")) == {
        "type": "error",
        "code": "not_joined",
        "message": "join room 'den' first",
        "ref": "d1",
    }
    await alice_a.nothing(QUIET)

    [row] = await moderation_log()
    assert row == {
        "kind": "room_ban",
        "actor": "root",
        "target": "bob",
        "room": "den",
        "message": None,
        "reason": "trolling",
        "detail": "no end",
    }
    ban = await db(Ban.objects.get)()
    assert await admin_log(Ban) == [(ADDITION, str(ban.pk), "root", "Added.")]


async def test_room_mute_refuses_sends_until_the_admin_lifts_it(
    server_a, server_b, admin, open_socket
):
    bob, bob_key = await user_with_key("bob")
    _, alice_key = await user_with_key("alice")
    den = await room_create("den")
    alice_a = await open_socket(server_a, "alice@A", key=alice_key)
    await join(alice_a, "den")
    bob_b = await open_socket(server_b, "bob@B", key=bob_key)
    await join(bob_b, "den")
    assert await alice_a.next_frame() == presence_frame("den", "bob", "online")

    await admin.add("mute", user=bob.pk, room=den.pk, reason="cool down", **NO_EXPIRY)

    assert await request(bob_b, send_frame("den", "hey", "m1")) == {
        "type": "error",
        "code": "muted",
        "message": "you are muted in 'den': cool down",
        "ref": "m1",
    }
    bob_a = await open_socket(server_a, "bob@A", key=bob_key)
    await join(bob_a, "den")
    assert await request(bob_a, send_frame("den", "hey", "m2")) == {
        "type": "error",
        "code": "muted",
        "message": "you are muted in 'den': cool down",
        "ref": "m2",
    }
    # Muted, not removed: bob still reads the room.
    assert (await room_history(bob_b, "den")) == []
    await alice_a.nothing(QUIET)

    mute = await db(Mute.objects.get)()
    await admin.delete("mute", mute.pk)

    sent = await send_and_ack(bob_b, "den", "thanks", "m3")
    assert sent["seq"] == 1
    assert await alice_a.expect("message") == sent
    row = {"actor": "root", "target": "bob", "room": "den", "message": None}
    assert await moderation_log() == [
        {**row, "kind": "mute", "reason": "cool down", "detail": "no end"},
        {**row, "kind": "unmute", "reason": "", "detail": ""},
    ]
    assert await admin_log(Mute) == [
        (ADDITION, str(mute.pk), "root", "Added."),
        (DELETION, str(mute.pk), "root", ""),
    ]


async def test_the_service_functions_reach_both_processes_without_the_admin(
    server_a, server_b, open_socket
):
    """The admin only calls the services: called directly, they act the same."""
    alice, alice_key = await user_with_key("alice")
    bob, bob_key = await user_with_key("bob")
    root = await db(get_user_model().objects.create_user)("mod")
    hall = await room_create("hall")
    [first] = await messages_create("hall", "alice", ["hidden soon"])
    alice_a = await open_socket(server_a, "alice@A", key=alice_key)
    await join(alice_a, "hall")
    bob_b = await open_socket(server_b, "bob@B", key=bob_key)
    await join(bob_b, "hall")
    await alice_a.expect("presence")

    started = time.monotonic()
    await db(services.message_hide)(message=first, actor=root, reason="rude")
    deleted = {"type": "message_deleted", "room": "hall", "id": first.pk, "seq": 1}
    for socket in (alice_a, bob_b):
        assert await expect_within(socket, started, "message_deleted") == deleted

    started = time.monotonic()
    await db(services.room_ban)(user=bob, room=hall, reason="flood", actor=root)
    assert await expect_within(bob_b, started, "removed") == {
        "type": "removed",
        "room": "hall",
        "reason": "banned from the room: flood",
    }
    assert await alice_a.next_frame() == presence_frame("hall", "bob", "offline")

    started = time.monotonic()
    await db(services.room_close)(room=hall, actor=root, reason="maintenance")
    assert await expect_within(alice_a, started, "removed") == {
        "type": "removed",
        "room": "hall",
        "reason": "room closed: maintenance",
    }

    started = time.monotonic()
    await db(services.connection_disconnect)(
        connection_id=bob_b.hello["connection_id"], actor=root
    )
    await closes_within([bob_b], started, (4403, "kicked by a moderator"))

    started = time.monotonic()
    await db(services.user_ban)(user=alice, reason="enough", actor=root)
    await closes_within([alice_a], started, (4403, "banned: enough"))
    assert await handshake_status(server_b, key=alice_key) == 403
    nothing = {"target": None, "room": None, "message": None, "detail": ""}
    assert await moderation_log() == [
        {
            **nothing,
            "kind": "message_delete",
            "actor": "mod",
            "target": "alice",
            "room": "hall",
            "message": first.pk,
            "reason": "rude",
        },
        {
            **nothing,
            "kind": "room_ban",
            "actor": "mod",
            "target": "bob",
            "room": "hall",
            "reason": "flood",
            "detail": "no end",
        },
        {
            **nothing,
            "kind": "room_close",
            "actor": "mod",
            "room": "hall",
            "reason": "maintenance",
        },
        {
            **nothing,
            "kind": "disconnect",
            "actor": "mod",
            "reason": "",
            "detail": f"connection {bob_b.hello['connection_id']}",
        },
        {
            **nothing,
            "kind": "ban",
            "actor": "mod",
            "target": "alice",
            "reason": "enough",
            "detail": "no end",
        },
    ]


# --- messages ----------------------------------------------------------------------


async def test_messages_deleted_in_the_admin_go_from_both_processes_and_history(
    server_a, server_b, admin, open_socket
):
    _, alice_key = await user_with_key("alice")
    _, bob_key = await user_with_key("bob")
    await room_create("news")
    bodies = ["one", "two", "three", "four", "five"]
    m1, m2, m3, m4, m5 = await messages_create("news", "alice", bodies)
    alice_a = await open_socket(server_a, "alice@A", key=alice_key)
    await join(alice_a, "news")
    bob_b = await open_socket(server_b, "bob@B", key=bob_key)
    await join(bob_b, "news")
    await alice_a.expect("presence")
    watchers = (alice_a, bob_b)

    def deleted(message):
        return {"type": "message_deleted", "room": "news", "id": message.pk}

    # The delete view of one message.
    started = time.monotonic()
    await admin.delete("message", m1.pk)
    for socket in watchers:
        frame = await expect_within(socket, started, "message_deleted")
        assert frame == {**deleted(m1), "seq": 1}
    # The bulk action, two at once.
    started = time.monotonic()
    changelist = "admin:chat_message_changelist"
    await admin.action(changelist, "hide_messages", [m2.pk, m3.pk])
    for socket in watchers:
        frames = [await expect_within(socket, started, "message_deleted")]
        frames.append(await expect_within(socket, started, "message_deleted"))
        frames.sort(key=lambda frame: frame["seq"])
        assert frames == [{**deleted(m2), "seq": 2}, {**deleted(m3), "seq": 3}]
    # Django's own "delete selected" action, confirmed.
    started = time.monotonic()
    await admin.action(changelist, "delete_selected", [m4.pk], post="yes")
    for socket in watchers:
        frame = await expect_within(socket, started, "message_deleted")
        assert frame == {**deleted(m4), "seq": 4}
        await socket.nothing(QUIET)

    for socket in watchers:
        shown = await room_history(socket, "news")
        assert [(m["seq"], m["deleted"], m["body"]) for m in shown] == [
            (1, True, ""),
            (2, True, ""),
            (3, True, ""),
            (4, True, ""),
            (5, False, "five"),
        ]
    # Rows stay (their seqs stay taken), the bodies kept for the record.
    assert await db(lambda: Message.objects.filter(deleted_at=None).count())() == 1
    # By message: the bulk action goes through them in the changelist's order.
    log = sorted(await moderation_log(), key=lambda row: row["message"])
    assert log == [
        {
            "kind": "message_delete",
            "actor": "root",
            "target": "alice",
            "room": "news",
            "message": message.pk,
            "reason": "",
            "detail": "",
        }
        for message in (m1, m2, m3, m4)
    ]
    assert m5.pk not in {r["message"] for r in log}
    history = sorted(
        (int(pk), flag, user, text) for flag, pk, user, text in await admin_log(Message)
    )
    hidden = "Deleted the message for everyone."
    assert history == [
        (m1.pk, DELETION, "root", ""),
        (m2.pk, CHANGE, "root", hidden),
        (m3.pk, CHANGE, "root", hidden),
        (m4.pk, DELETION, "root", ""),
    ]


async def test_a_room_moderator_edits_and_deletes_anyones_message_across_processes(
    server_a, server_b, open_socket
):
    _, alice_key = await user_with_key("alice")
    carol, carol_key = await user_with_key("carol")
    _, dave_key = await user_with_key("dave")
    club = await room_create("club")
    await db(services.membership_add)(
        room=club, user=carol, role=Membership.Role.MODERATOR
    )
    alice_b = await open_socket(server_b, "alice@B", key=alice_key)
    await join(alice_b, "club")
    sent = await send_and_ack(alice_b, "club", "rude words", "c1")
    carol_a = await open_socket(server_a, "carol@A", key=carol_key)
    await join(carol_a, "club")
    dave_a = await open_socket(server_a, "dave@A", key=dave_key)
    await join(dave_a, "club", skip=("presence",))

    refused = await request(
        dave_a,
        {
            "type": "edit",
            "room": "club",
            "id": sent["id"],
            "body": "mine now",
            "ref": "e0",
        },
    )
    assert refused == {
        "type": "error",
        "code": "forbidden",
        "message": "only the author or a moderator may change it",
        "ref": "e0",
    }

    ack, echo = await ack_and_echo(
        carol_a,
        "message_edited",
        type="edit",
        room="club",
        id=sent["id"],
        body="[edited]",
        ref="e",
    )
    assert ack == ack_of(sent, "e")
    stored = await stored_message("club", 1)
    assert stored["body"] == "[edited]"
    assert TIMESTAMP.fullmatch(stored["edited_at"]), stored
    edited = await alice_b.expect("message_edited", skip=("presence",))
    assert edited == echo
    assert edited == {
        "type": "message_edited",
        "room": "club",
        "id": sent["id"],
        "seq": 1,
        "body": "[edited]",
        "edited_at": stored["edited_at"],
        "mentions": [],
    }

    ack, _ = await ack_and_echo(
        carol_a, "message_deleted", type="delete", room="club", id=sent["id"], ref="d"
    )
    assert ack == ack_of(sent, "d")
    assert await alice_b.expect("message_deleted", skip=("presence",)) == {
        "type": "message_deleted",
        "room": "club",
        "id": sent["id"],
        "seq": 1,
    }
    assert await moderation_log() == [
        {
            "kind": "message_delete",
            "actor": "carol",
            "target": "alice",
            "room": "club",
            "message": sent["id"],
            "reason": "",
            "detail": "",
        }
    ]


# --- rooms -------------------------------------------------------------------------


async def test_closing_a_room_in_its_change_form_removes_everyone_and_refuses_sends(
    server_a, server_b, admin, open_socket
):
    _, alice_key = await user_with_key("alice")
    bob, bob_key = await user_with_key("bob")
    forum = await room_create("forum")
    await room_create("other")
    await messages_create("forum", "bob", ["before the close"])
    alice_a = await open_socket(server_a, "alice@A", key=alice_key)
    await join(alice_a, "forum")
    bob_b = await open_socket(server_b, "bob@B", key=bob_key)
    await join(bob_b, "forum")
    await join(bob_b, "other")
    await alice_a.expect("presence")

    started = time.monotonic()
    await admin.change("room", forum.pk, is_closed=True)

    for socket in (alice_a, bob_b):
        removed = await expect_within(socket, started, "removed", skip=("presence",))
        assert removed == {"type": "removed", "room": "forum", "reason": "room closed"}
    assert await db(lambda: Room.objects.get(slug="forum").is_closed)() is True
    # Only that room: bob stays in the other one.
    await send_and_ack(bob_b, "other", "elsewhere", "o1")

    # Rejoined, the room is readable and refuses sends.
    before = await stored_message("forum", 1)
    assert before["body"] == "before the close"
    del before["type"]  # history lists the message frames' payloads
    for socket, online in ((alice_a, ["alice"]), (bob_b, ["alice", "bob"])):
        joined = await join(socket, "forum", skip=("presence", "message"))
        # Both became members after the message: it was never unread to them.
        assert joined == joined_frame(
            "forum", online=online, last_seq=1, read_seq=1, closed=True
        )
        msg_id = f"x-{socket.name}"
        refused = await request(socket, send_frame("forum", "hello?", msg_id))
        assert refused == {
            "type": "error",
            "code": "room_closed",
            "message": "room 'forum' is closed",
            "ref": msg_id,
        }
        assert await room_history(socket, "forum") == [before]
    row = {"actor": "root", "target": None, "room": "forum", "message": None}
    closed = {**row, "kind": "room_close", "reason": "", "detail": ""}
    assert await moderation_log() == [closed]
    assert await admin_log(Room) == [
        (CHANGE, str(forum.pk), "root", "Changed Is closed.")
    ]

    # Unchecking it reopens the room.
    await admin.change("room", forum.pk, is_closed=False)
    # Both sockets are told, across the processes, so the page can write again.
    pushed = {"type": "push", "event": "room.reopened", "data": {"room": "forum"}}
    for socket in (alice_a, bob_b):
        assert await socket.expect("push", skip=("presence",)) == pushed
    sent = await send_and_ack(bob_b, "forum", "open again", "f2")
    assert sent["seq"] == 2
    assert await alice_a.expect("message", skip=("presence",)) == sent
    reopened = {**row, "kind": "room_reopen", "reason": "", "detail": ""}
    assert await moderation_log() == [closed, reopened]


async def test_the_close_rooms_action_removes_the_rooms_sockets(
    server_a, server_b, admin, open_socket
):
    _, alice_key = await user_with_key("alice")
    _, bob_key = await user_with_key("bob")
    market = await room_create("market")
    alice_a = await open_socket(server_a, "alice@A", key=alice_key)
    await join(alice_a, "market")
    bob_b = await open_socket(server_b, "bob@B", key=bob_key)
    await join(bob_b, "market")
    await alice_a.expect("presence")

    started = time.monotonic()
    await admin.action("admin:chat_room_changelist", "close_rooms", [market.pk])

    for socket in (alice_a, bob_b):
        removed = await expect_within(socket, started, "removed", skip=("presence",))
        assert removed == {"type": "removed", "room": "market", "reason": "room closed"}
    rejoined = await join(bob_b, "market", skip=("presence",))
    assert rejoined == joined_frame("market", online=["bob"], closed=True)
    refused = await request(bob_b, send_frame("market", "anyone?", "k1"))
    assert refused == {
        "type": "error",
        "code": "room_closed",
        "message": "room 'market' is closed",
        "ref": "k1",
    }
    assert [r["kind"] for r in await moderation_log()] == ["room_close"]
    assert await admin_log(Room) == [
        (CHANGE, str(market.pk), "root", "Closed the room.")
    ]


# --- live connections --------------------------------------------------------------


def _ours(connections, sockets):
    ids = {socket.hello["connection_id"] for socket in sockets}
    return {c["id"]: c for c in connections if c["id"] in ids}


async def live_page(admin, sockets, *, expect_count):
    """The live connections page once it lists ``expect_count`` of ``sockets``."""

    async def page():
        response = await admin.get("admin:chat_live_connections")
        assert response.status_code == 200
        return response, _ours(response.context["connections"], sockets)

    return await until(
        page,
        lambda shown: len(shown[1]) == expect_count,
        timeout=TIMEOUT,
        what=f"the live page listing {expect_count} of ours",
    )


async def test_live_connections_page_lists_both_processes_and_disconnects(
    server_a, server_b, admin, open_socket
):
    bob, bob_key = await user_with_key("bob")
    alice, alice_key = await user_with_key("alice")
    await room_create("lounge")
    await room_create("patio")
    opening = protocol.timestamp(timezone.now())
    bob_a = await open_socket(server_a, "bob@A", key=bob_key, device="phone")
    await join(bob_a, "lounge")
    alice_b = await open_socket(server_b, "alice@B", key=alice_key)
    opened = protocol.timestamp(timezone.now())
    await join(alice_b, "lounge")
    assert await bob_a.next_frame() == presence_frame("lounge", "alice", "online")
    await join(alice_b, "patio")
    assert process_of(bob_a) != process_of(alice_b)

    response, listed = await live_page(admin, [bob_a, alice_b], expect_count=2)
    for socket, user, rooms, device in (
        (bob_a, bob, ["lounge"], "phone"),
        (alice_b, alice, ["lounge", "patio"], None),
    ):
        entry = listed[socket.hello["connection_id"]]
        connected_at = entry["connected_at"]
        assert entry == {
            "id": socket.hello["connection_id"],
            "user_id": user.pk,
            "username": user.username,
            "process": process_of(socket),
            "connected_at": connected_at,
            "device": device,
            "rooms": rooms,
        }
        # Same format, same clock: the strings compare as the times do.
        assert TIMESTAMP.fullmatch(connected_at), connected_at
        assert opening <= connected_at <= opened, (opening, connected_at, opened)
    per_room = dict(response.context["per_room"])
    assert (per_room["lounge"], per_room["patio"]) == (2, 1)
    page = response.content.decode()
    for text in (
        bob_a.hello["connection_id"],
        alice_b.hello["connection_id"],
        process_of(bob_a),
        process_of(alice_b),
        "<td>phone</td>",
        "<td>lounge, patio</td>",
        "<tr><td>lounge</td><td>2</td></tr>",
        "<tr><td>patio</td><td>1</td></tr>",
    ):
        assert text in page, text

    started = time.monotonic()
    response = await admin.post(
        "admin:chat_live_connections",
        data={"connection_id": bob_a.hello["connection_id"], "reason": "cool it"},
    )
    assert response.status_code == 302

    await closes_within([bob_a], started, (4403, "kicked by a moderator: cool it"))
    assert await alice_b.next_frame() == presence_frame("lounge", "bob", "offline")
    await alive(alice_b)
    await live_page(admin, [bob_a, alice_b], expect_count=1)
    # A kick is no ban.
    await open_socket(server_b, "bob@B", key=bob_key)
    assert await moderation_log() == [
        {
            "kind": "disconnect",
            "actor": "root",
            "target": None,
            "room": None,
            "message": None,
            "reason": "cool it",
            "detail": f"connection {bob_a.hello['connection_id']}",
        }
    ]


# --- push --------------------------------------------------------------------------


async def live_count_settles(expected):
    """Wait until the registry counts ``expected`` live connections in all."""
    await until(
        registry.live_count,
        lambda count: count == expected,
        timeout=2 * HEARTBEAT + 1,
        what="live connections",
    )


def push_frame(event, data):
    return {"type": "push", "event": event, "data": data}


@pytest.fixture
async def push_setup(server_a, server_b, open_socket):
    """bob on A (in the plaza) and on B (not in it); alice on B, in the plaza."""
    bob, bob_key = await user_with_key("bob")
    _, alice_key = await user_with_key("alice")
    await room_create("plaza")
    alice_b = await open_socket(server_b, "alice@B", key=alice_key)
    await join(alice_b, "plaza")
    bob_a = await open_socket(server_a, "bob@A", key=bob_key)
    await join(bob_a, "plaza")
    assert await alice_b.next_frame() == presence_frame("plaza", "bob", "online")
    bob_b = await open_socket(server_b, "bob@B", key=bob_key)
    await live_count_settles(3)
    return SimpleNamespace(bob=bob, bob_a=bob_a, bob_b=bob_b, alice_b=alice_b)


async def receive_push(reached, missed, event, data):
    for socket in reached:
        assert await socket.next_frame() == push_frame(event, data), socket.name
    for socket in missed:
        await socket.nothing(QUIET)


async def test_push_from_python_sync_and_async_reaches_both_processes(push_setup):
    s = push_setup
    everyone = [s.bob_a, s.bob_b, s.alice_b]

    # Sync code (a view, a task): a plain call in a thread with no event loop.
    count = await sync_to_async(push.to_user)(s.bob, "invoice.paid", {"id": 7})
    assert count == 2
    await receive_push([s.bob_a, s.bob_b], [s.alice_b], "invoice.paid", {"id": 7})
    # Async code: awaited, with a user id.
    assert await push.to_user(s.bob.pk, "async.user", [1, "two"]) == 2
    await receive_push([s.bob_a, s.bob_b], [s.alice_b], "async.user", [1, "two"])

    assert await push.to_room("plaza", "room.news", {"n": 1}) == 2
    await receive_push([s.bob_a, s.alice_b], [s.bob_b], "room.news", {"n": 1})
    assert await sync_to_async(push.to_room)("plaza", "room.sync", None) == 2
    await receive_push([s.bob_a, s.alice_b], [s.bob_b], "room.sync", None)

    assert (
        await push.to_connection(s.bob_b.hello["connection_id"], "just.you", "hi") == 1
    )
    await receive_push([s.bob_b], [s.bob_a, s.alice_b], "just.you", "hi")
    one = await sync_to_async(push.to_connection)(
        s.bob_a.hello["connection_id"], "a", 1
    )
    assert one == 1
    await receive_push([s.bob_a], [s.bob_b, s.alice_b], "a", 1)

    assert await push.to_everyone("all.hands", {"ok": True}) == 3
    await receive_push(everyone, [], "all.hands", {"ok": True})
    assert await sync_to_async(push.to_everyone)("all.sync", {}) == 3
    await receive_push(everyone, [], "all.sync", {})


def command_env(cluster):
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": database_url(),
        "REDIS_URL": cluster.redis.url,
        "CHAT_HEARTBEAT": str(HEARTBEAT),
    }


async def test_chat_push_command_reaches_both_processes(cluster, push_setup):
    s = push_setup
    # As an operator runs it: its own process, the cluster's environment.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "manage.py",
        "chat_push",
        "--user",
        "bob",
        "deploy",
        '{"version": 2}',
        cwd=ROOT,
        env=command_env(cluster),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "Reached 2 connection(s)."
    await receive_push([s.bob_a, s.bob_b], [s.alice_b], "deploy", {"version": 2})

    # The same command in this process, for the other targets.
    for args, reached, missed, count in (
        (["--room", "plaza"], [s.bob_a, s.alice_b], [s.bob_b], 2),
        (["--all"], [s.bob_a, s.bob_b, s.alice_b], [], 3),
    ):
        out = StringIO()
        await sync_to_async(call_command)("chat_push", *args, "ev", "[1]", stdout=out)
        assert out.getvalue().strip() == f"Reached {count} connection(s)."
        await receive_push(reached, missed, "ev", [1])


def _http_post(url, body, headers):
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def api_push(server, body, *, key=None):
    """POST /api/push to a server process: (status, JSON answer)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return await asyncio.to_thread(
        _http_post, f"{server.http_url}/api/push", body, headers
    )


@db
def grant_push_permission(user):
    user.user_permissions.add(
        Permission.objects.get(content_type__app_label="chat", codename="push_message")
    )


async def test_api_push_reaches_both_processes_with_the_permission_only(
    server_a, server_b, push_setup
):
    s = push_setup
    pusher, key = await user_with_key("pusher")
    await grant_push_permission(pusher)
    _, plain_key = await user_with_key("plain")

    body = {"event": "order.shipped", "data": {"order": 9}, "user": "bob"}
    assert await api_push(server_a, body, key=key) == (202, {"connections": 2})
    await receive_push([s.bob_a, s.bob_b], [s.alice_b], "order.shipped", {"order": 9})

    for target, value, reached, missed in (
        ("room", "plaza", [s.bob_a, s.alice_b], [s.bob_b]),
        (
            "connection_id",
            s.bob_b.hello["connection_id"],
            [s.bob_b],
            [s.bob_a, s.alice_b],
        ),
        ("all", True, [s.bob_a, s.bob_b, s.alice_b], []),
    ):
        body = {"event": f"to.{target}", "data": None, target: value}
        status, answer = await api_push(server_b, body, key=key)
        assert (status, answer) == (202, {"connections": len(reached)}), target
        await receive_push(reached, missed, f"to.{target}", None)

    good = {"event": "e", "data": {}, "user": "bob"}
    no_token = "send Authorization: Bearer <API token>"
    one_target = "name exactly one target: user, room, connection_id, all"
    for body, push_key, status, error in (
        (
            good,
            plain_key,
            403,
            "this token's user lacks the chat.push_message permission",
        ),
        (good, None, 401, no_token),
        (good, "cs_not-a-token", 401, no_token),
        (b"{not json", key, 400, "the body is not valid JSON"),
        ({"data": {}, "user": "bob"}, key, 400, "the body needs an 'event' string"),
        ({**good, "room": "plaza"}, key, 400, one_target),
        ({"event": "e", "data": {}}, key, 400, one_target),
    ):
        answer = await api_push(server_a, body, key=push_key)
        assert answer == (status, {"error": error}), body
    for socket in (s.bob_a, s.bob_b, s.alice_b):
        await socket.nothing(QUIET)


# --- device keys -------------------------------------------------------------------


async def test_a_new_connection_with_the_same_device_key_replaces_the_old_anywhere(
    server_a, server_b, admin, open_socket
):
    bob, bob_key = await user_with_key("bob")
    _, alice_key = await user_with_key("alice")
    replaced = (4409, "replaced by a newer connection with the same device key")
    phone_a = await open_socket(server_a, "bob phone@A", key=bob_key, device="phone")
    laptop_a = await open_socket(server_a, "bob laptop@A", key=bob_key, device="laptop")
    alice_phone = await open_socket(
        server_a, "alice phone@A", key=alice_key, device="phone"
    )

    started = time.monotonic()
    phone_b = await open_socket(server_b, "bob phone@B", key=bob_key, device="phone")
    await closes_within([phone_a], started, replaced)
    await alive(laptop_a)
    await alive(alice_phone)
    await alive(phone_b)

    sockets = [phone_a, laptop_a, alice_phone, phone_b]
    _, listed = await live_page(admin, sockets, expect_count=3)
    assert {(c["username"], c["device"], c["process"]) for c in listed.values()} == {
        ("bob", "laptop", process_of(laptop_a)),
        ("alice", "phone", process_of(alice_phone)),
        ("bob", "phone", process_of(phone_b)),
    }
    assert phone_b.hello["connection_id"] in listed

    # And back: a phone socket on A replaces the one on B.
    started = time.monotonic()
    again = await open_socket(
        server_a, "bob phone@A again", key=bob_key, device="phone"
    )
    await closes_within([phone_b], started, replaced)
    await alive(again)
    await alive(laptop_a)
