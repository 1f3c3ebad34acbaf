"""Team chat on the room page in headless Chromium against a real daphne:
reactions, replies in a thread, attachments, @mentions and #m<seq> jumps (to a
reply too: its thread opens)."""

import re
import struct
import zlib

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from chat import services
from tests import test_browser
from tests.servers import DaphneServer
from tests.test_browser import (
    in_thread,
    open_room,
    room_create,
    send,
    sign_up,
    stored,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# The browser, its pages and the server process, as in tests/test_browser.py.
browser = test_browser.browser
new_page = test_browser.new_page
server = test_browser.server


def two_in_lobby(server, new_page):
    alice, bob = new_page(), new_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    open_room(alice, server, "lobby")
    open_room(bob, server, "lobby")
    return alice, bob


def message(page, seq, where="#messages"):
    return page.locator(f'{where} .message[data-seq="{seq}"]')


def png_1x1():
    """A valid 1×1 red PNG."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


def test_a_reaction_shows_live_and_goes_when_taken_back(server, new_page):
    alice, bob = two_in_lobby(server, new_page)
    send(alice, "ship it?")
    on_bob = message(bob, 1)
    expect(on_bob.locator(".body")).to_have_text("ship it?")

    on_bob.hover()
    on_bob.get_by_role("button", name="React", exact=True).click()
    bob.get_by_role("button", name="React 👍").click()

    on_alice = message(alice, 1)
    reaction = on_alice.locator(".reaction")
    expect(reaction).to_have_count(1)
    expect(reaction).to_have_text("👍 1")
    expect(reaction).to_have_attribute("title", "👍 1: bob")
    expect(reaction).to_have_attribute("aria-label", "👍 1: bob")
    expect(reaction).to_have_attribute("aria-pressed", "false")
    mine = on_bob.locator(".reaction")
    expect(mine).to_have_text("👍 1")
    expect(mine).to_have_attribute("aria-pressed", "true")

    alice.get_by_role("button", name="👍 1: bob").click()  # alice adds hers
    expect(reaction).to_have_text("👍 2")
    expect(reaction).to_have_attribute("title", "👍 2: bob, alice")
    expect(reaction).to_have_attribute("aria-pressed", "true")
    expect(mine).to_have_text("👍 2")
    alice.get_by_role("button", name="👍 2: bob, alice").click()  # and takes it back
    expect(mine).to_have_attribute("title", "👍 1: bob")

    mine.click()
    expect(on_alice.locator(".reaction")).to_have_count(0)
    expect(on_bob.locator(".reaction")).to_have_count(0)


def test_a_reply_lives_in_its_thread_and_the_parent_counts_it(server, new_page):
    alice, bob = two_in_lobby(server, new_page)
    send(alice, "lunch plans?")
    parent = message(alice, 1)
    expect(parent.locator(".body")).to_have_text("lunch plans?")
    parent.hover()
    parent.get_by_role("button", name="Reply").click()
    expect(alice.locator("#thread")).to_be_visible()
    expect(alice.locator("#thread-parent .body")).to_have_text("lunch plans?")
    alice.locator("#thread-input").fill("pizza at noon")
    alice.locator("#thread-input").press("Enter")
    expect(alice.locator("#thread-messages .message[data-seq] .body")).to_have_text(
        ["pizza at noon"]
    )
    expect(parent.locator(".replies")).to_have_text("1 reply")

    on_bob = message(bob, 1)
    expect(on_bob.locator(".replies")).to_have_text("1 reply")
    expect(bob.locator("#thread")).to_be_hidden()
    # Slack's way: the reply is in the thread only.
    expect(bob.locator("#messages .message")).to_have_count(1)
    expect(alice.locator("#messages .message")).to_have_count(1)
    on_bob.locator(".replies").click()
    expect(bob.locator("#thread-messages .message .body")).to_have_text(
        ["pizza at noon"]
    )
    expect(bob.locator("#thread-messages .message .author")).to_have_text(["alice"])

    send(alice, "anyone?")  # the timeline goes on, and seq 2 was the reply
    expect(bob.locator("#messages .message[data-seq] .body")).to_have_text(
        ["lunch plans?", "anyone?"]
    )
    assert bob.locator("#messages .message").nth(1).get_attribute("data-seq") == "3"

    bob.keyboard.press("Escape")
    expect(bob.locator("#thread")).to_be_hidden()

    bob.reload()  # history keeps the reply out of the timeline too
    expect(message(bob, 3).locator(".body")).to_have_text("anyone?")
    expect(bob.locator("#messages .message")).to_have_count(2)
    expect(message(bob, 1).locator(".replies")).to_have_text("1 reply")


def test_an_image_shows_inline_and_a_text_file_as_a_link(server, new_page):
    alice, bob = two_in_lobby(server, new_page)
    notes = b"x" * 1229  # 1.2 KB
    alice.locator("#file-input").set_input_files(
        [
            {"name": "pixel.png", "mimeType": "image/png", "buffer": png_1x1()},
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": notes},
        ]
    )
    chips = alice.locator("#attachment-chips .chip")
    expect(chips).to_have_count(2)
    expect(alice.locator("#attachment-chips .chip-state")).to_have_count(0)
    expect(alice.locator("#attachment-chips .chip-name")).to_have_text(
        ["pixel.png", "notes.txt"]
    )
    send(alice, "the files")
    expect(chips).to_have_count(0)

    on_bob = message(bob, 1)
    expect(on_bob.locator(".body")).to_have_text("the files")
    image = on_bob.locator(".attachment.image img")
    expect(image).to_have_count(1)
    expect(image).to_have_attribute("alt", "pixel.png")
    expect(image).to_have_attribute("src", re.compile(r"^/uploads/\d+/pixel\.png$"))
    bob.wait_for_function(
        "() => { const i = document.querySelector('.attachment.image img');"
        " return i && i.complete && i.naturalWidth === 1; }"
    )
    link = on_bob.locator(".attachment:not(.image)")
    expect(link).to_have_text(["notes.txt · 1.2 KB"])
    expect(link).to_have_attribute("href", re.compile(r"^/uploads/\d+/notes\.txt$"))


@pytest.fixture
def small_upload_server(transactional_db):
    """A server taking files of up to 2000 bytes.

    (At the default 10 MiB a file over the limit meets DATA_UPLOAD_MAX_MEMORY_SIZE
    first: chat.views.nul_refused reads the whole body, and the answer is 400.)
    """
    server = DaphneServer(extra_env={"CHAT_MAX_UPLOAD_BYTES": "2000"}).start()
    yield server
    server.stop()


def test_an_upload_over_the_limit_says_so(small_upload_server, new_page):
    alice, bob = two_in_lobby(small_upload_server, new_page)
    alice.locator("#file-input").set_input_files(
        [{"name": "big.txt", "mimeType": "text/plain", "buffer": b"0" * 2001}]
    )
    expect(alice.locator("#status")).to_have_text("big.txt is too large to upload.")
    expect(alice.locator("#attachment-chips .chip")).to_have_count(0)
    alice.locator("#file-input").set_input_files(
        [{"name": "ok.txt", "mimeType": "text/plain", "buffer": b"0" * 2000}]
    )
    expect(alice.locator("#attachment-chips .chip-name")).to_have_text(["ok.txt"])
    expect(alice.locator("#attachment-chips .chip-state")).to_have_count(0)
    alice.get_by_role("button", name="Remove ok.txt").click()
    expect(alice.locator("#attachment-chips .chip")).to_have_count(0)


def test_a_mention_picked_with_the_keyboard_highlights_it_for_bob(server, new_page):
    alice, bob = two_in_lobby(server, new_page)

    def add_bobby():
        user = get_user_model().objects.create_user(username="bobby")
        room = services.selectors.room_get_readable(slug="lobby", user=user)
        services.membership_add(room=room, user=user)

    in_thread(add_bobby)
    composer = alice.locator("#message-input")
    composer.press_sequentially("lunch @bo")
    options = alice.locator("#mention-list .mention-option")
    expect(options).to_have_text(["bob", "bobby"])
    expect(options.nth(0)).to_have_attribute("aria-selected", "true")
    composer.press("ArrowDown")
    expect(options.nth(1)).to_have_attribute("aria-selected", "true")
    composer.press("ArrowDown")  # round to the top
    expect(options.nth(0)).to_have_attribute("aria-selected", "true")
    composer.press("Enter")
    expect(alice.locator("#mention-list")).to_be_hidden()
    expect(composer).to_have_value("lunch @bob ")
    composer.press_sequentially("now?")
    composer.press("Enter")

    on_bob = message(bob, 1)
    expect(on_bob.locator(".body")).to_have_text("lunch @bob now?")
    expect(on_bob).to_have_class(re.compile(r"\bmentions-me\b"))
    expect(on_bob.locator(".mention-note")).to_have_text("mentions you")
    expect(on_bob.locator(".body .mention")).to_have_text(["@bob"])
    on_alice = message(alice, 1)
    expect(on_alice.locator(".body .mention")).to_have_text(["@bob"])
    expect(on_alice.locator(".mention-note")).to_have_count(0)
    assert "mentions-me" not in (on_alice.get_attribute("class") or "")

    composer.press_sequentially("@bo")  # Escape closes the list
    expect(options).to_have_count(2)
    composer.press("Escape")
    expect(alice.locator("#mention-list")).to_be_hidden()
    expect(composer).to_have_value("@bo")


def test_a_jump_to_an_old_message_shows_it_highlighted(server, new_page):
    alice = new_page()
    sign_up(alice, server, "alice")
    room_create(slug="lobby", title="The Lobby")

    def fill():
        user = get_user_model().objects.get(username="alice")
        room = services.selectors.room_get_readable(slug="lobby", user=user)
        for number in range(1, 121):
            services.message_create(
                room=room,
                author=user,
                body=f"number {number}",
                client_msg_id=f"c{number}",
            )

    in_thread(fill)
    alice.goto(f"{server.http_url}/r/lobby/#m5")
    target = alice.locator("#m5")
    expect(target.locator(".body")).to_have_text("number 5")
    expect(target).to_have_class(re.compile(r"\bhighlight\b"))
    expect(target).to_be_in_viewport()
    # Everything newer comes too, once each, and the live timeline goes on.
    expect(alice.locator("#messages .message[data-seq]")).to_have_count(120)
    send(alice, "still live")
    expect(alice.locator("#m121 .body")).to_have_text("still live")
    seqs = alice.locator("#messages .message[data-seq]").evaluate_all(
        "items => items.map(item => Number(item.dataset.seq))"
    )
    assert seqs == list(range(1, 122))


HIGHLIGHTED = re.compile(r"\bhighlight\b")


def test_a_search_result_that_is_a_reply_opens_its_thread_highlighted(server, new_page):
    alice, bob = two_in_lobby(server, new_page)
    send(alice, "lunch plans?")
    parent = message(alice, 1)
    parent.hover()
    parent.get_by_role("button", name="Reply").click()
    alice.locator("#thread-input").fill("pizza at noon")
    alice.locator("#thread-input").press("Enter")
    send(alice, "anyone else hungry?")
    expect(stored(bob).locator(".body")).to_have_text(
        ["lunch plans?", "anyone else hungry?"]
    )
    expect(message(bob, 1).locator(".replies")).to_have_text("1 reply")
    expect(bob.locator("#thread")).to_be_hidden()
    bob.evaluate("window.notReloaded = true")

    box = bob.get_by_role("searchbox", name="Search messages")
    box.fill("pizza")
    box.press("Enter")
    result = bob.locator(".search-result a")
    expect(result.locator(".search-result-body")).to_have_text(["pizza at noon"])
    expect(result).to_have_attribute("href", "/r/lobby/#m2")
    result.click()

    expect(bob).to_have_url(f"{server.http_url}/r/lobby/#m2")
    expect(bob.locator("#thread")).to_be_visible()
    expect(bob.locator("#thread-parent .body")).to_have_text("lunch plans?")
    reply = bob.locator("#thread-messages .message")
    expect(reply.locator(".body")).to_have_text(["pizza at noon"])
    expect(reply).to_have_class(HIGHLIGHTED)
    expect(reply).to_be_in_viewport()
    expect(bob.locator("#m2")).to_have_count(0)  # still not in the timeline
    # This page had the reply: it opened the thread without a reload.
    assert bob.evaluate("window.notReloaded") is True

    # The same result again, the thread closed: the address does not change.
    bob.keyboard.press("Escape")
    expect(bob.locator("#thread")).to_be_hidden()
    result.click()
    expect(bob.locator("#thread")).to_be_visible()
    expect(reply.locator(".body")).to_have_text(["pizza at noon"])
    expect(reply).to_have_class(HIGHLIGHTED)
    assert bob.evaluate("window.notReloaded") is True


def test_a_link_to_a_reply_opens_its_thread_with_the_reply_highlighted(
    server, new_page
):
    alice = new_page()
    sign_up(alice, server, "alice")
    room_create(slug="lobby", title="The Lobby")

    def fill():
        """seq 1 the thread's first message, 2–61 others, 62 the reply, 63–102."""
        user = get_user_model().objects.get(username="alice")
        room = services.selectors.room_get_readable(slug="lobby", user=user)

        def create(body, client_msg_id, reply_to=None):
            created, _ = services.message_create(
                room=room,
                author=user,
                body=body,
                client_msg_id=client_msg_id,
                reply_to=reply_to,
            )
            return created

        parent = create("lunch plans?", "parent")
        for number in range(1, 61):
            create(f"number {number}", f"c{number}")
        reply = create("pizza at noon", "reply", reply_to=parent.pk)
        for number in range(61, 101):
            create(f"number {number}", f"c{number}")
        return reply.seq

    assert in_thread(fill) == 62
    alice.goto(f"{server.http_url}/r/lobby/#m62")

    expect(alice.locator("#thread")).to_be_visible()
    reply = alice.locator("#thread-messages .message")
    expect(reply.locator(".body")).to_have_text(["pizza at noon"])
    expect(reply).to_have_class(HIGHLIGHTED)
    expect(reply).to_be_in_viewport()
    # The page around seq 62 starts at seq 38: the first message is further back.
    expect(alice.locator("#thread-parent")).to_have_text(
        "The message this thread answers is further back in the room."
    )
    # The timeline: seqs 38 to 102 but the reply.
    expect(stored(alice)).to_have_count(64)
    expect(alice.locator("#m62")).to_have_count(0)
    # Scrolling up brings the older page (seqs 1 to 37), and it into the thread.
    alice.locator("#timeline").evaluate("timeline => { timeline.scrollTop = 0; }")
    expect(message(alice, 1).locator(".body")).to_have_text("lunch plans?")
    expect(stored(alice)).to_have_count(101)
    expect(alice.locator("#thread-parent .body")).to_have_text("lunch plans?")
    expect(alice.locator("#thread-parent .author")).to_have_text("alice")
    expect(message(alice, 1, "#thread-parent")).to_have_count(1)
    expect(message(alice, 1).locator(".replies")).to_have_text("1 reply")
