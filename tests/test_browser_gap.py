"""The room page in headless Chromium fills a seq gap with history.

The daphne process runs without Redis, so a message the test process stores
never reaches the server's channel layer: it is stored, its broadcast lost, as
when a layer message expires. The next live message shows the page the jump.
"""

import json

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from chat import services
from tests import test_browser
from tests.test_browser import (
    in_thread,
    message_create_by,
    open_room,
    room_create,
    send,
    seqs,
    sign_up,
    stored,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# The browser, its pages and the server process, as in tests/test_browser.py.
browser = test_browser.browser
new_page = test_browser.new_page
server = test_browser.server


def gap_requests_of(page):
    """The gap-filling ``history`` frames the page sends, as a list kept up to date."""
    sent = []

    def on_frame(payload):
        frame = json.loads(payload)
        if frame.get("type") == "history" and frame["ref"].startswith("gap"):
            sent.append({key: frame[key] for key in ("before", "limit")})

    page.on("websocket", lambda socket: socket.on("framesent", on_frame))
    return sent


def messages_store(*, room, usernames):
    """Store a message by each of ``usernames`` in one commit (seqs in order)."""
    users = {user.username: user for user in get_user_model().objects.all()}
    requests = [
        services.SendRequest(room, users[name], f"lost {n}", f"lost-{n}")
        for n, name in enumerate(usernames, start=1)
    ]
    services.message_create_many(requests=requests)


def test_a_message_whose_broadcast_was_lost_shows_once_the_next_one_arrives(
    server, new_page
):
    alice, bob = new_page(), new_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room = room_create(slug="lobby", title="The Lobby")
    requests = gap_requests_of(alice)
    open_room(alice, server, "lobby")
    open_room(bob, server, "lobby")

    in_thread(
        message_create_by,
        username="alice",
        room=room,
        body="lost on the way",
        client_msg_id="lost-1",
    )
    alice.wait_for_timeout(1000)
    expect(stored(alice)).to_have_count(0)  # nothing told the pages about it
    send(bob, "live")

    expected = ["lost on the way", "live"]
    for page in (alice, bob):
        expect(stored(page).locator(".body")).to_have_text(expected)
        assert seqs(page) == ["1", "2"]
    expect(bob.locator("#messages .message.pending")).to_have_count(0)
    expect(alice.locator('#messages .message[data-seq="1"] .author')).to_have_text(
        "alice"
    )
    assert requests == [{"before": 2, "limit": 1}]


def test_a_gap_over_two_pages_with_removed_messages_is_asked_for_twice(
    server, new_page, make_user
):
    page = new_page()
    sign_up(page, server, "alice")
    in_thread(make_user, username="carol")
    room = room_create(slug="lobby", title="The Lobby")
    requests = gap_requests_of(page)
    open_room(page, server, "lobby")

    in_thread(messages_store, room=room, usernames=["carol"] + ["alice"] * 119)
    # Deleting a user removes their messages: seq 1 is gone from history.
    in_thread(lambda: get_user_model().objects.filter(username="carol").delete())
    send(page, "live")

    expect(stored(page)).to_have_count(120)
    assert seqs(page) == [str(seq) for seq in range(2, 122)]
    expect(stored(page).last.locator(".body")).to_have_text("live")
    expect(stored(page).first.locator(".body")).to_have_text("lost 2")
    page.wait_for_timeout(1000)  # time for any further request to show
    assert requests == [{"before": 121, "limit": 100}, {"before": 21, "limit": 20}]
