"""A banned user's open room page, in headless Chromium, says what happened.

The ban is made in this process, through the admin (Django's test client), and
the page's socket is held by a daphne process: both use a redis-server of the
test's own, so the ban's after-commit order crosses between them as it would
in production. Browser, server and helpers as in ``tests/test_browser.py``.
"""

import time

import pytest
from django.contrib.auth import get_user_model
from django.test import Client as HttpClient
from django.urls import reverse
from playwright.sync_api import expect

from chat.models import ModerationAction
from tests import test_browser
from tests.servers import DaphneServer, RedisServer, this_process_uses_redis
from tests.test_browser import in_thread, open_room, room_create, screenshot, sign_up

pytestmark = [
    pytest.mark.browser,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True),
]

browser = test_browser.browser
new_page = test_browser.new_page


@pytest.fixture
def server(transactional_db):
    redis = RedisServer().start()
    daphne = DaphneServer(redis_url=redis.url)
    try:
        daphne.start()
        with this_process_uses_redis(redis.url):
            yield daphne
    finally:
        print(f"--- daphne log ---\n{daphne.output()}")
        daphne.stop()
        redis.stop()


def ban_in_the_admin(*, username, reason):
    """A superuser submits the admin's ban form: a site-wide ban, no end."""
    User = get_user_model()
    root = User.objects.create_superuser("root", "root@example.com", "pw")
    admin = HttpClient()
    admin.force_login(root)
    target = User.objects.get(username=username)
    response = admin.post(
        reverse("admin:chat_ban_add"),
        {
            "user": target.pk,
            "room": "",
            "reason": reason,
            "expires_at_0": "",
            "expires_at_1": "",
            "_save": "Save",
        },
    )
    assert response.status_code == 302, response.content.decode()[-3000:]


def test_a_banned_users_open_page_shows_they_were_disconnected_and_why(
    server, new_page
):
    bob = new_page()
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    open_room(bob, server, "lobby")
    sockets_opened = []
    bob.on("websocket", lambda websocket: sockets_opened.append(websocket.url))

    in_thread(ban_in_the_admin, username="bob", reason="spamming")
    banned_at = time.monotonic()

    state = bob.locator("#connection-state")
    status = bob.locator("#banner-text")
    # Within the 2 seconds of the ban, in the banner.
    expect(status).to_have_text("You are banned from this site: spamming", timeout=2000)
    expect(bob.locator("#banner")).to_have_attribute("data-kind", "banned")
    expect(bob.locator("#message-input")).to_be_disabled()
    assert time.monotonic() - banned_at <= 2.5
    expect(state).to_have_attribute("data-state", "offline")
    screenshot(bob, "banned.png")
    # The page does not try to come back (a reconnect would be refused anyway).
    # What is tested is an absence: no new socket for longer than the first
    # reconnect's back-off. Only time shows it.
    bob.wait_for_timeout(1500)
    assert sockets_opened == []
    expect(state).to_have_attribute("data-state", "offline")
    expect(status).to_have_text("You are banned from this site: spamming")
    kinds = in_thread(lambda: list(ModerationAction.objects.values_list("kind")))
    assert kinds == [("ban",)]
