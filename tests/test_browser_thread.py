"""Team chat's harder paths on the room page, in headless Chromium against a real
daphne: a long thread paged back, the reaction picker by keyboard alone, files
pasted into or dropped on the composer, and a thread at phone width."""

import base64
import re

import pytest
from playwright.sync_api import expect

from chat import services
from chat.models import Room
from tests import test_browser, test_browser_client
from tests.test_browser import in_thread, open_room, room_create, send, sign_up
from tests.test_browser_client import PHONE, inside_window, overflow, user_get
from tests.test_browser_team import message, png_1x1, two_in_lobby

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

browser = test_browser.browser
server = test_browser_client.server
new_page = test_browser_client.new_page

HISTORY_PAGE = 50  # chat.js's page of history and of a thread


def thread_create(*, slug, username, replies):
    """A first message and ``replies`` replies to it, by ``username``."""
    room, author = Room.objects.get(slug=slug), user_get(username)
    parent, _ = services.message_create(
        room=room, author=author, body="the plan", client_msg_id="parent"
    )
    for number in range(1, replies + 1):
        services.message_create(
            room=room,
            author=author,
            body=f"step {number}",
            client_msg_id=f"reply-{number}",
            reply_to=parent.pk,
        )
    return parent.pk


def thread_bodies(page):
    return page.locator("#thread-messages .message[data-seq] .body")


def test_a_long_thread_shows_its_latest_replies_and_pages_back(server, new_page):
    alice = new_page()
    sign_up(alice, server, "alice")
    room_create(slug="lobby", title="The Lobby")
    in_thread(thread_create, slug="lobby", username="alice", replies=HISTORY_PAGE + 7)
    open_room(alice, server, "lobby")
    parent = message(alice, 1)
    expect(parent.locator(".replies")).to_have_text(f"{HISTORY_PAGE + 7} replies")
    expect(alice.locator("#messages .message[data-seq]")).to_have_count(1)

    parent.locator(".replies").click()
    expect(alice.locator("#thread-parent .body")).to_have_text("the plan")
    latest = [f"step {n}" for n in range(8, HISTORY_PAGE + 8)]
    expect(thread_bodies(alice)).to_have_text(latest)
    older = alice.locator("#thread-older")
    expect(older).to_be_visible()
    older.click()
    expect(thread_bodies(alice)).to_have_text(
        [f"step {n}" for n in range(1, HISTORY_PAGE + 8)]
    )
    expect(older).to_be_hidden()
    # The thread's replies stayed out of the room's timeline.
    expect(alice.locator("#messages .message[data-seq]")).to_have_count(1)

    alice.locator("#thread-input").fill("done")
    alice.locator("#thread-input").press("Enter")
    expect(thread_bodies(alice).last).to_have_text("done")
    expect(parent.locator(".replies")).to_have_text(f"{HISTORY_PAGE + 8} replies")


WALK_TO_REACT = ["Reply", "React"]


def test_the_reaction_picker_works_by_keyboard_alone(server, new_page):
    alice, bob = two_in_lobby(server, new_page)
    send(alice, "ship it?")
    on_bob = message(bob, 1)
    expect(on_bob.locator(".body")).to_have_text("ship it?")

    # The message takes focus and shows its tools; Tab walks to "React".
    on_bob.focus()
    walked = []
    for _ in WALK_TO_REACT:
        bob.keyboard.press("Tab")
        walked.append(bob.evaluate("document.activeElement.textContent.trim()"))
    assert walked == WALK_TO_REACT
    opener = on_bob.get_by_role("button", name="React", exact=True)
    expect(opener).to_be_focused()
    bob.keyboard.press("Enter")
    expect(opener).to_have_attribute("aria-expanded", "true")
    picker = on_bob.get_by_role("group", name="Pick a reaction")
    expect(picker.get_by_role("button")).to_have_count(6)
    expect(picker.get_by_role("button", name="React 👍")).to_be_focused()
    bob.keyboard.press("Escape")  # closes the picker, not anything around it
    expect(picker).to_have_count(0)
    expect(opener).to_be_focused()
    expect(opener).to_have_attribute("aria-expanded", "false")

    bob.keyboard.press("Enter")
    bob.keyboard.press("Tab")
    expect(picker.get_by_role("button", name="React ❤️")).to_be_focused()
    bob.keyboard.press("Enter")
    expect(picker).to_have_count(0)
    expect(opener).to_be_focused()
    for page in (alice, bob):
        reaction = message(page, 1).locator(".reaction")
        expect(reaction).to_have_text("❤️ 1")
        expect(reaction).to_have_attribute("aria-label", "❤️ 1: bob")
    # The reaction's echo rebuilt the buttons; focus stayed on the opener.
    expect(opener).to_be_focused()
    expect(opener).to_have_attribute("aria-expanded", "false")
    # The count is a toggle button too: Space takes bob's back.
    message(bob, 1).locator(".reaction").focus()
    bob.keyboard.press("Space")
    expect(message(alice, 1).locator(".reaction")).to_have_count(0)


FILES_TO_DATA_TRANSFER = """([name, type, data]) => {
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type }));
    return transfer;
}"""


def data_transfer(page, name, mime_type, data):
    """A DataTransfer holding one file, as the clipboard or a drag brings it."""
    encoded = base64.b64encode(data).decode()
    return page.evaluate_handle(FILES_TO_DATA_TRANSFER, [name, mime_type, encoded])


def test_a_file_pasted_or_dropped_on_the_composer_is_attached(server, new_page):
    alice, bob = two_in_lobby(server, new_page)

    # A screenshot pasted into the message box.
    pasted = data_transfer(alice, "screenshot.png", "image/png", png_1x1())
    alice.locator("#message-input").evaluate(
        "(box, transfer) => box.dispatchEvent(new ClipboardEvent('paste',"
        " { clipboardData: transfer, bubbles: true, cancelable: true }))",
        pasted,
    )
    chips = alice.locator("#attachment-chips .chip")
    expect(alice.locator("#attachment-chips .chip-name")).to_have_text(
        ["screenshot.png"]
    )
    expect(alice.locator("#attachment-chips .chip-state")).to_have_count(0)
    # Pasting a file puts no text in the box.
    expect(alice.locator("#message-input")).to_have_value("")

    # A file dragged over the composer marks it, and dropped is attached too.
    composer = alice.locator("#composer")
    dropped = data_transfer(alice, "notes.txt", "text/plain", b"x" * 1229)
    composer.dispatch_event("dragover", {"dataTransfer": dropped})
    expect(composer).to_have_class(re.compile(r"\bdropping\b"))
    composer.dispatch_event("drop", {"dataTransfer": dropped})
    expect(composer).not_to_have_class(re.compile(r"\bdropping\b"))
    expect(alice.locator("#attachment-chips .chip-name")).to_have_text(
        ["screenshot.png", "notes.txt"]
    )
    expect(alice.locator("#attachment-chips .chip-state")).to_have_count(0)
    send(alice, "both files")
    expect(chips).to_have_count(0)

    on_bob = message(bob, 1)
    expect(on_bob.locator(".body")).to_have_text("both files")
    image = on_bob.locator(".attachment.image img")
    expect(image).to_have_attribute("alt", "screenshot.png")
    expect(image).to_have_attribute(
        "src", re.compile(r"^/uploads/\d+/screenshot\.png$")
    )
    link = on_bob.locator(".attachment:not(.image)")
    expect(link).to_have_text(["notes.txt · 1.2 KB"])
    expect(link).to_have_attribute("href", re.compile(r"^/uploads/\d+/notes\.txt$"))


def test_a_thread_at_phone_width_covers_the_room_and_closes_back(server, new_page):
    alice = new_page(viewport=PHONE)
    sign_up(alice, server, "alice")
    room_create(slug="lobby", title="The Lobby")
    in_thread(thread_create, slug="lobby", username="alice", replies=3)
    open_room(alice, server, "lobby")
    replies = message(alice, 1).locator(".replies")
    expect(replies).to_have_text("3 replies")

    replies.click()
    thread = alice.locator("#thread")
    expect(thread).to_be_visible()
    expect(thread_bodies(alice)).to_have_text(["step 1", "step 2", "step 3"])
    assert overflow(alice) == 0
    # It covers the timeline, and what it holds fits the window.
    timeline = alice.locator("#timeline").bounding_box()
    box = thread.bounding_box()
    assert box["width"] >= timeline["width"] - 1, (box, timeline)
    for control in (
        alice.locator("#thread-input"),
        alice.locator("#thread-close"),
        message(alice, 4, where="#thread-messages").get_by_role("button", name="Edit"),
    ):
        expect(control).to_be_visible()
        inside_window(alice, control)
    expect(alice.locator("#thread-input")).to_be_focused()

    alice.locator("#thread-input").fill("and step 4")
    alice.locator("#thread-input").press("Enter")
    expect(thread_bodies(alice).last).to_have_text("and step 4")
    alice.keyboard.press("Escape")
    expect(thread).to_be_hidden()
    expect(replies).to_have_text("4 replies")
    expect(replies).to_be_focused()
    assert overflow(alice) == 0


def test_an_edit_that_adds_a_mention_of_me_marks_it_live(server, new_page):
    alice, bob = two_in_lobby(server, new_page)
    send(alice, "who has the keys?")
    on_bob = message(bob, 1)
    expect(on_bob.locator(".body")).to_have_text("who has the keys?")
    expect(on_bob).not_to_have_class(re.compile(r"\bmentions-me\b"))

    alice.locator("#message-input").focus()
    alice.keyboard.press("ArrowUp")
    box = message(alice, 1).get_by_role("textbox", name="Edit your message")
    box.fill("@bob, who has the keys?")
    box.press("Enter")
    expect(on_bob.locator(".body")).to_have_text("@bob, who has the keys?")
    expect(on_bob).to_have_class(re.compile(r"\bmentions-me\b"))
    expect(on_bob.locator(".mention-note")).to_have_text("mentions you")
    # Not on alice's page: it is her own message.
    expect(message(alice, 1)).not_to_have_class(re.compile(r"\bmentions-me\b"))

    box = message(alice, 1).get_by_role("textbox", name="Edit your message")
    alice.locator("#message-input").focus()
    alice.keyboard.press("ArrowUp")
    box.fill("who has the keys?")
    box.press("Enter")
    expect(on_bob).not_to_have_class(re.compile(r"\bmentions-me\b"))
    expect(on_bob.locator(".mention-note")).to_have_count(0)
