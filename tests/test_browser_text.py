"""Text people typed, in real Chromium: shown as typed, kept to itself.

A bidi override (U+202E), a right-to-left run or zero-width characters in a
message or a room title are neither interpreted as markup nor allowed to
reorder what the page shows next to them.
"""

import pytest
from playwright.sync_api import expect

from tests import test_browser
from tests.test_browser import open_room, room_create, send, sign_up

pytestmark = pytest.mark.browser

# The browser, its pages and the server process, as in tests/test_browser.py.
browser = test_browser.browser
new_page = test_browser.new_page
server = test_browser.server

OVERRIDE = "\u202e"  # RIGHT-TO-LEFT OVERRIDE
ZERO_WIDTH = "\u200b"


def computed(locator, prop):
    return locator.evaluate(f"node => getComputedStyle(node).{prop}")


def test_bidi_overrides_and_zero_width_characters_stay_inside_their_text(
    server, new_page
):
    room_create(slug="mixed", title=f"{OVERRIDE}evil title")
    page = new_page()
    sign_up(page, server, "carol")

    # The room list and the room page show the title as it was typed, isolated.
    link = page.locator("#public-rooms a")
    expect(link).to_have_text(f"{OVERRIDE}evil title")
    assert computed(link, "unicodeBidi") == "isolate"
    open_room(page, server, "mixed")
    assert computed(page.locator(".room-head h1"), "unicodeBidi") == "isolate"

    body = f"{OVERRIDE}gnp.exe{ZERO_WIDTH} <i>x</i> שלום"
    send(page, body)
    message = page.locator('#messages .message[data-seq="1"]')
    expect(message.locator(".body")).to_have_text(body)
    expect(page.locator("#messages i")).to_have_count(0)
    assert computed(message.locator(".body"), "unicodeBidi") == "plaintext"
    assert computed(message.locator(".author"), "unicodeBidi") == "isolate"
    # The override reorders the message's own text only: the author's name, on
    # the line above, is laid out left to right as before.
    author = message.locator(".author")
    expect(author).to_have_text("carol")
    assert computed(author, "direction") == "ltr"
