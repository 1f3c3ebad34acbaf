"""The room page's reconnect delays in headless Chromium: full jitter, and a
first retry after a 1001 spread over a short window.

The delays come from ``window.chatsite.reconnectDelay(attempt, closeCode,
random)``, evaluated in the page with fixed random values.
"""

import pytest
from playwright.sync_api import expect

from tests import test_browser
from tests.test_browser import expect_online, open_room, room_create, sign_up

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# The browser, its pages and the server process, as in tests/test_browser.py.
browser = test_browser.browser
new_page = test_browser.new_page
server = test_browser.server

FIRST_MS = 500
MAX_MS = 10_000
FIRST_AFTER_1001_MS = 2_000


def delay(page, attempt, code, random):
    return page.evaluate(
        "([a, c, r]) => window.chatsite.reconnectDelay(a, c, r)",
        [attempt, code, random],
    )


@pytest.fixture
def page(server, new_page):
    page = new_page()
    sign_up(page, server, "alice")
    room_create(slug="lobby", title="The Lobby")
    return page


def test_backoff_is_full_jitter_up_to_the_cap(server, page):
    open_room(page, server, "lobby")
    ceilings = [500, 1000, 2000, 4000, 8000, 10_000, 10_000]
    for attempt, ceiling in enumerate(ceilings):
        assert delay(page, attempt, 1006, 0) == 0
        assert delay(page, attempt, 1006, 0.5) == ceiling // 2
        assert delay(page, attempt, 1006, 0.999) == int(ceiling * 0.999)
        assert delay(page, attempt, 1006, 0.999) < ceiling
    assert delay(page, 30, 1006, 0.999) == int(MAX_MS * 0.999)
    constants = page.evaluate(
        "() => [window.chatsite.BACKOFF_FIRST_MS, window.chatsite.BACKOFF_MAX_MS,"
        " window.chatsite.FIRST_AFTER_1001_MS]"
    )
    assert constants == [FIRST_MS, MAX_MS, FIRST_AFTER_1001_MS]


def test_the_first_retry_after_a_1001_is_spread_over_a_short_window(server, page):
    open_room(page, server, "lobby")
    assert delay(page, 0, 1001, 0) == 0
    assert delay(page, 0, 1001, 0.5) == FIRST_AFTER_1001_MS // 2
    assert delay(page, 0, 1001, 0.999) == int(FIRST_AFTER_1001_MS * 0.999)
    # Only the first: a retry that fails goes on with the normal backoff.
    assert delay(page, 1, 1001, 0.5) == 500


# Every Math.random() in the page says 0.999, and each text the connection
# state shows is logged with its time.
RECORD_STATES = """
Math.random = () => 0.999;
window.states = [];
document.addEventListener("DOMContentLoaded", () => {
  const state = document.getElementById("connection-state");
  new MutationObserver(() => states.push([Date.now(), state.textContent])).observe(
    state, { childList: true, characterData: true, subtree: true });
});
"""


def test_a_page_closed_with_1001_waits_its_spread_delay_and_reconnects(server, page):
    page.add_init_script(RECORD_STATES)
    open_room(page, server, "lobby")

    server.stop()  # SIGTERM: the server closes every socket with 1001
    expect(page.locator("#connection-state")).to_contain_text("reconnecting")
    server.start()  # the same port
    expect_online(page)

    states = page.evaluate("() => window.states")
    texts = [text for _, text in states]
    first = texts.index("reconnecting in 2s")  # 1998 ms: 2s on the countdown
    assert "online" in texts[:first] and "reconnecting in 1s" not in texts[:first]
    retried = first + texts[first:].index("reconnecting…")  # connect() again
    waited = states[retried][0] - states[first][0]
    assert 1900 <= waited <= 2300, states
