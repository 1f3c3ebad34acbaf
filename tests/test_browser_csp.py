"""The Content-Security-Policy in headless Chromium: no page of the site breaks it.

Every page records the ``securitypolicyviolation`` events it sees (an init
script, which CSP does not govern); Chromium also logs each violation to the
console. Both must stay empty through sign-in, the room list, a live room and
the admin.
"""

import time

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from tests import test_browser
from tests.test_browser import (
    PASSWORD,
    TIMEOUT_MS,
    expect_online,
    in_thread,
    room_create,
    send,
    sign_up,
    stored,
)

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

browser = test_browser.browser
new_page = test_browser.new_page
server = test_browser.server

RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.cspViolations.push(
    `${event.effectiveDirective} blocked ${event.blockedURI || "inline"}` +
      ` at ${event.sourceFile}:${event.lineNumber}`
  );
});
"""


def policy_for(server):
    return sorted(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            f"connect-src 'self' ws://127.0.0.1:{server.port}",
            "img-src 'self' data:",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        ]
    )


@pytest.fixture
def watched_page(new_page):
    """A page whose CSP violations, event or console message, are collected."""
    console = []

    def make():
        page = new_page()
        page.add_init_script(RECORD_VIOLATIONS)
        page.on(
            "console",
            lambda message: (
                console.append(message.text)
                if "Content Security Policy" in message.text
                else None
            ),
        )
        page.console_messages = console
        return page

    return make


def visit(page, url, policy):
    """Open ``url``; its answer carries ``policy``."""
    response = page.goto(url)
    assert sorted(response.headers["content-security-policy"].split("; ")) == policy


def violations(page):
    """What the page's document reported so far, then Chromium's console."""
    page.wait_for_load_state("load")
    return page.evaluate("window.cspViolations"), page.console_messages


def superuser_make(*, username):
    get_user_model().objects.filter(username=username).update(
        is_staff=True, is_superuser=True
    )


def test_sign_in_room_list_and_a_live_room_break_no_policy(server, watched_page):
    policy = policy_for(server)
    room_create(slug="lobby", title="The Lobby")
    page = watched_page()

    visit(page, f"{server.http_url}/accounts/login/", policy)
    assert violations(page) == ([], [])
    sign_up(page, server, "alice")
    assert violations(page) == ([], [])
    visit(page, f"{server.http_url}/", policy)
    expect(page.locator("#public-rooms a")).to_have_text(["The Lobby"])
    assert violations(page) == ([], [])

    visit(page, f"{server.http_url}/r/lobby/", policy)
    expect_online(page)
    send(page, "hello under a strict policy")
    expect(stored(page).locator(".body")).to_have_text(["hello under a strict policy"])
    assert violations(page) == ([], [])


def admin_sign_in(page, server, policy):
    visit(page, f"{server.http_url}/admin/login/", policy)
    page.locator("#id_username").fill("root")
    page.locator("#id_password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{server.http_url}/admin/")


def test_the_admin_breaks_no_policy(server, watched_page):
    policy = policy_for(server)
    room = room_create(slug="lobby", title="The Lobby")
    page = watched_page()
    # Signed up through the site: the server hashes the password its own way.
    sign_up(page, server, "root")
    in_thread(superuser_make, username="root")
    page.context.clear_cookies()

    admin_sign_in(page, server, policy)
    assert violations(page) == ([], [])

    visit(page, f"{server.http_url}/admin/chat/room/", policy)
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    page.locator("#action-toggle").check()  # actions.js at work
    expect(page.locator(".action-counter")).to_have_text("1 of 1 selected")
    assert violations(page) == ([], [])

    visit(page, f"{server.http_url}/admin/chat/room/{room.pk}/change/", policy)
    # The membership inline's user field is an autocomplete (select2).
    page.locator(".add-row a").click()
    page.locator(".select2-selection").last.click()
    expect(page.locator(".select2-search__field")).to_be_visible()
    assert violations(page) == ([], [])

    visit(page, f"{server.http_url}/admin/chat/room/add/", policy)
    page.locator("#id_title").press_sequentially("Book Club")  # fills in the slug
    expect(page.locator("#id_slug")).to_have_value("book-club")
    assert violations(page) == ([], [])

    visit(page, f"{server.http_url}/admin/chat/room/live/", policy)
    assert violations(page) == ([], [])


def test_an_inline_script_and_style_are_refused_and_seen(server, watched_page):
    page = watched_page()
    visit(page, f"{server.http_url}/accounts/login/", policy_for(server))

    page.evaluate(
        """() => {
          const script = document.createElement("script");
          script.textContent = "window.ranInline = true";
          document.body.append(script);
          document.body.insertAdjacentHTML("beforeend", '<p style="color: red">x</p>');
        }"""
    )

    page.wait_for_function("window.cspViolations.length === 2")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while len(page.console_messages) < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    events, console = violations(page)
    assert page.evaluate("window.ranInline === undefined") is True
    assert sorted(event.split(" at ")[0] for event in events) == [
        "script-src-elem blocked inline",
        "style-src-attr blocked inline",
    ]
    assert len(console) == 2
    assert all("violates the following Content Security Policy" in m for m in console)
