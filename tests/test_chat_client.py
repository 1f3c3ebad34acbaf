"""``python manage.py chat_client`` driven in a pseudo-terminal (pexpect) against
real daphne processes: history, sending, live messages, presence, reconnect."""

import asyncio
import os
import sys

import pexpect
import pytest
from channels.db import database_sync_to_async

from chat import services
from chat.client import ChatClient
from chat.models import Room
from tests.servers import ROOT, database_url
from tests.test_multiprocess import user_with_key

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

TIMEOUT = 20


@pytest.fixture
def daphnes(start_daphne, own_redis):
    return [start_daphne(redis_url=own_redis.url) for _ in range(2)]


@database_sync_to_async
def room_with_history(slug, author, bodies):
    room = services.room_create(slug=slug, title=f"Room {slug}")
    for n, body in enumerate(bodies):
        services.message_create(
            room=room, author=author, body=body, client_msg_id=f"h{n}"
        )
    return Room.objects.get(pk=room.pk)


def terminal_client(urls, key, room, django_db_blocker):
    with django_db_blocker.unblock():
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            "DJANGO_DEBUG": "1",
            "DATABASE_URL": database_url(),
            "TERM": "xterm",
            "PROMPT_TOOLKIT_NO_CPR": "1",
        }
    env.pop("REDIS_URL", None)
    args = ["manage.py", "chat_client", "--token", key, room]
    for url in urls:
        args += ["--url", url]
    child = pexpect.spawn(
        sys.executable,
        args,
        cwd=str(ROOT),
        env=env,
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 120),
    )
    child.logfile_read = sys.stdout  # shown when a test fails
    return child


async def expect(child, pattern):
    """Wait (without blocking the loop) until the terminal shows ``pattern``."""
    await asyncio.to_thread(child.expect, pattern)


async def test_a_terminal_session_chats_and_survives_its_server_going_away(
    daphnes, django_db_blocker
):
    first, second = daphnes
    dave, dave_key = await user_with_key("dave")
    bob, bob_key = await user_with_key("bob")
    await room_with_history("den", bob, ["first words", "second words"])
    bob_client = await ChatClient(second.ws_url, token=bob_key).connect()
    await bob_client.join("den")
    child = terminal_client(
        [first.ws_url, second.ws_url], dave_key, "den", django_db_blocker
    )
    try:
        await expect(child, "connected as dave")
        await expect(child, r"joined #den: 2 online: bob, dave")
        await expect(child, r"\[\d\d:\d\d\] bob: first words")
        await expect(child, r"\[\d\d:\d\d\] bob: second words")
        await expect(child, "#den>")
        assert (await bob_client.next_event("presence")) == {
            "type": "presence",
            "room": "den",
            "user": "dave",
            "status": "online",
        }

        # What dave types reaches bob; what bob says shows in dave's terminal.
        child.sendline("hello from the terminal")
        message = await bob_client.next_event("message")
        assert (message["user"]["username"], message["body"], message["seq"]) == (
            "dave",
            "hello from the terminal",
            3,
        )
        await bob_client.send_message("den", "hi dave")
        await expect(child, r"\[\d\d:\d\d\] bob: hi dave")

        # Dave's server goes away: the client says so, comes back on the
        # other and shows what was said meanwhile, once.
        first.stop()
        await expect(child, r"\* connection lost; reconnecting")
        await bob_client.send_message("den", "while you were away")
        await expect(child, r"\* reconnected")
        await expect(child, r"bob: while you were away")
        await bob_client.send_message("den", "welcome back")
        await expect(child, r"bob: welcome back")
        before = child.before
        assert "while you were away" not in before  # shown once, above

        child.sendline("/quit")
        await asyncio.to_thread(child.expect, pexpect.EOF)
    finally:
        child.close(force=True)
        await bob_client.close()
