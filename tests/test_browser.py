"""The room page in headless Chromium against a real daphne process.

Playwright's sync API must not run inside a running event loop. These tests are
plain ``def`` tests: pytest-asyncio's session loop exists but is not running
while they do, so Playwright starts a loop of its own. That loop then counts as
running in the test's thread, where Django refuses database calls; ``in_thread``
makes them in a thread of their own.

Set ``CHAT_SCREENSHOTS=<dir>`` to save a screenshot of the room page there.
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connections
from playwright.sync_api import expect, sync_playwright

from chat import services
from tests.servers import DaphneServer, require_binary

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000
PASSWORD = "a-long-pass-9876"


@pytest.fixture
def server(transactional_db):
    server = DaphneServer().start()
    yield server
    server.stop()


@pytest.fixture
def browser():
    chromium = require_binary("chromium")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser):
    """A page in a browser context of its own: its own cookies, its own user.

    A script error on any page fails the test.
    """
    errors = []

    def make():
        context = browser.new_context(viewport={"width": 1100, "height": 700})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        return page

    yield make
    assert errors == []


def in_thread(func, /, **kwargs):
    """Call ``func`` (database work) in a thread with no running event loop."""

    def call():
        try:
            return func(**kwargs)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result()


def room_create(**kwargs):
    return in_thread(services.room_create, **kwargs)


def sign_up(page, server, username):
    page.goto(f"{server.http_url}/accounts/signup/")
    page.locator("#id_username").fill(username)
    page.locator("#id_password1").fill(PASSWORD)
    page.locator("#id_password2").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(f"{server.http_url}/")
    expect(page.locator(".whoami strong")).to_have_text(username)


def open_room(page, server, slug):
    page.goto(f"{server.http_url}/r/{slug}/")
    expect_online(page)


def expect_online(page):
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "online")
    expect(page.locator("#connection-state")).to_have_text("online")


def send(page, text):
    page.locator("#message-input").fill(text)
    page.locator("#message-input").press("Enter")


def stored(page):
    """The messages the page shows with a seq (not pending ones)."""
    return page.locator("#messages .message[data-seq]")


def seqs(page):
    return stored(page).evaluate_all("items => items.map(item => item.dataset.seq)")


def screenshot(page, name):
    directory = os.environ.get("CHAT_SCREENSHOTS")
    if directory:
        page.screenshot(path=Path(directory) / name)


def test_two_users_chat_live_and_history_survives_a_reload(server, new_page):
    alice, bob = new_page(), new_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")

    screenshot(alice, "room_list.png")
    alice.locator("#id_slug").fill("lobby")
    alice.locator("#id_title").fill("The Lobby")
    alice.get_by_role("button", name="Create room").click()
    expect(alice).to_have_url(f"{server.http_url}/r/lobby/")
    expect_online(alice)
    bob.reload()
    bob.get_by_role("link", name="The Lobby").click()
    expect(bob).to_have_url(f"{server.http_url}/r/lobby/")
    expect_online(bob)
    expect(alice.locator("#online li")).to_have_text(["alice", "bob"])
    expect(bob.locator("#online li")).to_have_text(["alice", "bob"])

    send(alice, "hello <b>bob</b>")

    first = bob.locator('#messages .message[data-seq="1"]')
    expect(first.locator(".author")).to_have_text("alice")
    expect(first.locator(".body")).to_have_text("hello <b>bob</b>")
    expect(bob.locator("#messages b")).to_have_count(0)
    expect(alice.locator('#messages .message[data-seq="1"] .body')).to_have_text(
        "hello <b>bob</b>"
    )
    expect(alice.locator("#messages .message.pending")).to_have_count(0)

    bob.locator("#message-input").press_sequentially("hi al")
    expect(alice.locator("#typing")).to_have_text("bob is typing…")
    bob.locator("#message-input").fill("hi alice & co")
    bob.locator("#send-button").click()

    second = alice.locator('#messages .message[data-seq="2"]')
    expect(second.locator(".author")).to_have_text("bob")
    expect(second.locator(".body")).to_have_text("hi alice & co")
    expect(alice.locator("#typing")).to_have_text("")
    screenshot(alice, "room.png")

    bob.reload()
    expect_online(bob)
    expect(stored(bob).locator(".body")).to_have_text(
        ["hello <b>bob</b>", "hi alice & co"]
    )
    expect(stored(bob).locator(".author")).to_have_text(["alice", "bob"])
    assert seqs(bob) == ["1", "2"]
    expect(bob.locator("#messages b")).to_have_count(0)
    expect(bob.locator("#online li")).to_have_text(["alice", "bob"])


def test_edit_and_delete_of_own_messages_reach_the_other_page(server, new_page):
    alice, bob = new_page(), new_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    open_room(alice, server, "lobby")
    open_room(bob, server, "lobby")
    send(alice, "first draft")
    send(bob, "not yours")
    expect(stored(alice).locator(".body")).to_have_text(["first draft", "not yours"])
    expect(stored(bob).locator(".body")).to_have_text(["first draft", "not yours"])

    own = alice.locator('#messages .message[data-seq="1"]')
    own.hover()
    own.get_by_role("button", name="Edit").click()
    # Edited in place: the body becomes a box holding it, Enter saves.
    box = own.get_by_role("textbox", name="Edit your message")
    expect(box).to_be_focused()
    expect(box).to_have_value("first draft")
    box.fill("second draft")
    box.press("Enter")
    expect(box).to_have_count(0)

    on_bob = bob.locator('#messages .message[data-seq="1"]')
    expect(on_bob.locator(".body")).to_have_text("second draft")
    expect(on_bob.locator(".edited")).to_be_visible()
    expect(on_bob.locator(".edited")).to_have_text("(edited)")
    # Only one's own messages have the buttons.
    expect(alice.locator('#messages .message[data-seq="2"] button')).to_have_count(0)
    expect(on_bob.locator("button")).to_have_count(0)

    own.hover()
    own.get_by_role("button", name="Delete").click()
    confirm_dialog(alice, "Delete this message for everyone?", "Delete")

    expect(on_bob.locator(".body")).to_have_text("message deleted")
    expect(on_bob).to_have_class("message deleted")
    expect(own.locator("button")).to_have_count(0)
    bob.reload()
    expect_online(bob)
    expect(stored(bob).locator(".body")).to_have_text(["message deleted", "not yours"])


def confirm_dialog(page, question, answer):
    """Answer the page's confirm dialog (a modal <dialog>, Cancel focused)."""
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#confirm-text")).to_have_text(question)
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    dialog.get_by_role("button", name=answer).click()
    expect(dialog).to_be_hidden()


def message_create_by(*, username, **kwargs):
    author = get_user_model().objects.get(username=username)
    return services.message_create(author=author, **kwargs)


def test_a_server_restart_loses_nothing_on_screen(server, new_page):
    alice, bob = new_page(), new_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room = room_create(slug="lobby", title="The Lobby")
    open_room(alice, server, "lobby")
    open_room(bob, server, "lobby")
    send(alice, "before the restart")
    expect(stored(bob).locator(".body")).to_have_text(["before the restart"])

    server.stop()

    for page in (alice, bob):
        state = page.locator("#connection-state")
        expect(state).to_have_attribute("data-state", "reconnecting")
        expect(state).to_contain_text("reconnecting")
    # Stored meanwhile, as another server process would: bob recovers it with since.
    in_thread(
        message_create_by,
        username="alice",
        room=room,
        body="stored during the outage",
        client_msg_id="outage-1",
    )
    send(alice, "typed during the outage")
    expect(alice.locator("#messages .message.pending .body")).to_have_text(
        "typed during the outage"
    )
    screenshot(alice, "reconnecting.png")

    server.start()  # the same port

    expect_online(alice)
    expect_online(bob)
    expected = [
        "before the restart",
        "stored during the outage",
        "typed during the outage",
    ]
    expect(stored(bob).locator(".body")).to_have_text(expected)
    expect(stored(alice).locator(".body")).to_have_text(expected)
    expect(alice.locator("#messages .message.pending")).to_have_count(0)
    assert seqs(bob) == ["1", "2", "3"]
    assert seqs(alice) == ["1", "2", "3"]
    expect(bob.locator("#online li")).to_have_text(["alice", "bob"])
    stored_rows = in_thread(
        lambda: list(room.messages.values_list("seq", "author__username", "body"))
    )
    assert stored_rows == [
        (1, "alice", "before the restart"),
        (2, "alice", "stored during the outage"),
        (3, "alice", "typed during the outage"),
    ]


def messages_create(*, room, username, count):
    author = get_user_model().objects.get(username=username)
    for number in range(1, count + 1):
        services.message_create(
            room=room,
            author=author,
            body=f"message {number}",
            client_msg_id=f"m{number}",
        )


def read_seq_of(*, room, username):
    return room.memberships.get(user__username=username).read_seq


def test_load_older_pages_back_to_the_first_message(server, new_page):
    alice, bob = new_page(), new_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room = room_create(slug="lobby", title="The Lobby")
    in_thread(messages_create, room=room, username="alice", count=60)

    open_room(bob, server, "lobby")

    expect(stored(bob)).to_have_count(50)
    assert seqs(bob) == [str(seq) for seq in range(11, 61)]
    older = bob.get_by_role("button", name="Load older")
    expect(older).to_be_visible()
    older.click()
    expect(stored(bob)).to_have_count(60)
    assert seqs(bob) == [str(seq) for seq in range(1, 61)]
    expect(stored(bob).first.locator(".body")).to_have_text("message 1")
    expect(older).to_be_hidden()
    # The read marker follows what the page shows (sent debounced).
    expect(bob.locator("#connection-state")).to_have_text("online")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while in_thread(read_seq_of, room=room, username="bob") != 60:
        assert time.monotonic() < deadline, "the read marker never reached 60"
        bob.wait_for_timeout(100)
