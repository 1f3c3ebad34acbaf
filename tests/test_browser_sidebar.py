"""The room page's sidebar (chat/static/chat/sidebar.js) in headless Chromium.

The sidebar lists the user's rooms from ``rooms`` with unread and mention
badges kept live, puts the total unread in the page title, searches messages,
raises browser notifications for mentions and direct messages while the page
is hidden, and folds behind a "Rooms" button on a phone.

The other users type on room pages of their own, or send a ``dm`` through a
socket their page opens for the purpose (``socket_send``): the server's channel
layer lives in its own process, so messages stored by this one would reach no
page live.
"""

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from chat import services
from tests import test_browser
from tests.servers import DaphneServer
from tests.test_browser import (
    confirm_dialog,
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

SOCKET_SEND = """
async (frames) => {
  const ws = new WebSocket(`ws://${location.host}/ws/`, ["chat.v1"]);
  const replies = [];
  await new Promise((resolve, reject) => {
    let waiting = frames.length;
    ws.onerror = () => reject(new Error("socket error"));
    ws.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "hello") {
        for (const each of frames) ws.send(JSON.stringify(each));
      } else if (frame.ref && frame.ref.startsWith("t-")) {
        replies.push(frame);
        waiting -= 1;
        if (waiting === 0) resolve();
      }
    };
  });
  ws.close();
  return replies;
}
"""

# Notifications are recorded (and still made), and the page is hidden.
HIDDEN_AND_RECORDING = """
Object.defineProperty(Document.prototype, "hidden", {
  get: () => true,
  configurable: true,
});
Object.defineProperty(Document.prototype, "visibilityState", {
  get: () => "hidden",
  configurable: true,
});
window.notificationsMade = [];
const RealNotification = window.Notification;
function RecordingNotification(title, options) {
  window.notificationsMade.push({ title, body: options && options.body });
  return new RealNotification(title, options);
}
Object.defineProperty(RecordingNotification, "permission", {
  get: () => RealNotification.permission,
});
RecordingNotification.requestPermission = (...args) =>
  RealNotification.requestPermission(...args);
RecordingNotification.prototype = RealNotification.prototype;
window.Notification = RecordingNotification;
"""


@pytest.fixture
def sidebar_page(new_page):
    """``new_page``; ``page.sockets`` lists the URLs of the WebSockets it opened."""

    def make():
        page = new_page()
        page.sockets = []
        page.on("websocket", lambda socket: page.sockets.append(socket.url))
        return page

    return make


def socket_send(page, *frames):
    """Send ``frames`` (refs added) on a socket of ``page``'s user; their replies."""
    numbered = [{**frame, "ref": f"t-{n}"} for n, frame in enumerate(frames)]
    replies = page.evaluate(SOCKET_SEND, numbered)
    assert [reply["type"] for reply in replies] == ["ack"] * len(frames), replies
    return replies


def dm(page, to, body, client_msg_id):
    return socket_send(
        page, {"type": "dm", "to": to, "body": body, "client_msg_id": client_msg_id}
    )[0]


def sidebar_room(page, name):
    """The sidebar's link of the room shown as ``name``."""
    return page.locator(".sidebar-room").filter(
        has=page.locator(".sidebar-room-name", has_text=name)
    )


def expect_counts(link, text, unread, mention):
    """The link's accessible counts and its two badges (None: no badge)."""
    if text is None:
        expect(link.locator(".sidebar-counts")).to_have_count(0)
    else:
        expect(link.locator(".sidebar-counts")).to_have_text(text)
    for selector, value in ((".badge-unread", unread), (".badge-mention", mention)):
        if value is None:
            expect(link.locator(selector)).to_have_count(0)
        else:
            expect(link.locator(selector)).to_have_text(value)


def room_names(page):
    return page.locator(".sidebar-room .sidebar-room-name")


def test_a_direct_message_raises_the_badge_live_and_opening_it_clears_it(
    server, sidebar_page
):
    alice, bob = sidebar_page(), sidebar_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    open_room(alice, server, "lobby")
    open_room(bob, server, "lobby")
    expect(room_names(bob)).to_have_text(["The Lobby"])
    expect(sidebar_room(bob, "The Lobby")).to_have_attribute("aria-current", "page")
    expect(sidebar_room(bob, "The Lobby")).to_have_attribute("href", "/r/lobby/")
    expect(bob).to_have_title("The Lobby · chatsite")
    # Permission not asked yet: the sidebar offers it, and asks nothing on load.
    expect(bob.get_by_role("button", name="Enable notifications")).to_be_visible()
    bob.evaluate("window.notReloaded = true")

    ack = dm(alice, "bob", "psst, bob", "dm-1")

    dm_link = sidebar_room(bob, "alice")
    expect(dm_link).to_have_attribute("href", f"/r/{ack['room']}/")
    expect_counts(dm_link, "1 unread", "1", None)
    expect(bob.get_by_role("link", name="alice 1 unread")).to_have_count(1)
    expect(bob).to_have_title("(1) The Lobby · chatsite")
    # Most recent activity first; the lobby itself stays read.
    expect(room_names(bob)).to_have_text(["alice", "The Lobby"])
    expect_counts(sidebar_room(bob, "The Lobby"), None, None, None)
    assert bob.evaluate("window.notReloaded") is True
    # One socket for the page and its sidebar.
    assert bob.sockets == [server.ws_url]
    # alice's own message counts nothing for her.
    expect_counts(sidebar_room(alice, "bob"), None, None, None)
    expect(alice).to_have_title("The Lobby · chatsite")

    dm(alice, "bob", "still there, @bob?", "dm-2")
    expect_counts(dm_link, "2 unread, 1 mention", "2", "@1")
    expect(bob).to_have_title("(2) The Lobby · chatsite")
    test_browser.screenshot(bob, "sidebar.png")

    dm_link.click()
    expect(bob).to_have_url(f"{server.http_url}/r/{ack['room']}/")
    expect(stored(bob).locator(".body")).to_have_text(
        ["psst, bob", "still there, @bob?"]
    )
    dm_link = sidebar_room(bob, "alice")
    expect(dm_link).to_have_attribute("aria-current", "page")
    expect_counts(dm_link, None, None, None)
    expect(bob).to_have_title("alice · chatsite")
    expect(sidebar_room(bob, "The Lobby")).not_to_have_attribute("aria-current", "page")


# Every counts text the lobby's link ever shows, from now on.
RECORD_LOBBY_COUNTS = """
() => {
  window.lobbyCounts = [];
  const lobby = '.sidebar-room[data-room="lobby"] .sidebar-counts';
  new MutationObserver(() => {
    const counts = document.querySelector(lobby);
    if (counts) window.lobbyCounts.push(counts.textContent);
  }).observe(document.getElementById("room-sidebar"), {
    childList: true,
    subtree: true,
  });
}
"""


def test_messages_in_another_room_raise_its_unread_and_mention_badges(
    server, sidebar_page
):
    alice, bob = sidebar_page(), sidebar_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    room_create(slug="random", title="Random")
    open_room(bob, server, "random")  # a member of both now
    open_room(bob, server, "lobby")
    expect(room_names(bob)).to_have_text(["The Lobby", "Random"])
    open_room(alice, server, "lobby")
    bob.evaluate(RECORD_LOBBY_COUNTS)

    send(alice, "in the lobby, where bob is")
    expect(stored(bob).locator(".body")).to_have_text(["in the lobby, where bob is"])
    open_room(alice, server, "random")
    send(alice, "hello random")
    random = sidebar_room(bob, "Random")
    expect_counts(random, "1 unread", "1", None)
    expect(bob).to_have_title("(1) The Lobby · chatsite")

    send(alice, "@bob have a look")
    expect_counts(random, "2 unread, 1 mention", "2", "@1")
    expect(bob).to_have_title("(2) The Lobby · chatsite")
    expect(room_names(bob)).to_have_text(["Random", "The Lobby"])
    # The room bob is reading never counts, not even until chat.js reads it.
    expect_counts(sidebar_room(bob, "The Lobby"), None, None, None)
    assert bob.evaluate("window.lobbyCounts") == []

    # Deleting the mention: the counts come from the server again.
    own = alice.locator('#messages .message[data-seq="2"]')
    own.hover()
    own.get_by_role("button", name="Delete").click()
    confirm_dialog(alice, "Delete this message for everyone?", "Delete")
    expect_counts(random, "1 unread", "1", None)
    expect(bob).to_have_title("(1) The Lobby · chatsite")

    # A reload asks the server: the same counts.
    bob.reload()
    test_browser.expect_online(bob)
    expect_counts(sidebar_room(bob, "Random"), "1 unread", "1", None)
    expect(bob).to_have_title("(1) The Lobby · chatsite")


def messages_create(*, room, username, bodies):
    author = get_user_model().objects.get(username=username)
    for number, body in enumerate(bodies, start=1):
        services.message_create(
            room=room, author=author, body=body, client_msg_id=f"s{number}"
        )


def test_search_finds_a_message_in_another_room_and_links_to_it(server, sidebar_page):
    alice, bob = sidebar_page(), sidebar_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    random = room_create(slug="random", title="Random")
    open_room(bob, server, "random")
    open_room(bob, server, "lobby")
    open_room(alice, server, "random")
    send(alice, "the deploy window is friday")
    send(alice, "deploying is fun")  # a whole word only: not found
    expect_counts(sidebar_room(bob, "Random"), "2 unread", "2", None)

    box = bob.get_by_role("searchbox", name="Search messages")
    box.fill("deploy")
    box.press("Enter")
    results = bob.locator(".search-result")
    expect(bob.locator(".sidebar-results-status")).to_have_text("1 result")
    expect(results).to_have_count(1)
    expect(results.locator(".search-result-room")).to_have_text(["Random"])
    expect(results.locator(".search-result-author")).to_have_text(["alice"])
    expect(results.locator(".search-result-body")).to_have_text(
        ["the deploy window is friday"]
    )
    expect(results.locator(".search-result-time")).not_to_have_text([""])
    expect(bob.locator(".sidebar-room-list")).to_be_hidden()
    expect(bob.get_by_role("button", name="More")).to_be_hidden()
    test_browser.screenshot(bob, "sidebar_search.png")

    # Escape goes back to the room list; clearing the box does too.
    box.press("Escape")
    expect(box).to_have_value("")
    expect(bob.locator(".sidebar-results")).to_be_hidden()
    expect(room_names(bob)).to_have_text(["Random", "The Lobby"])
    box.fill("nothing-like-this")
    box.press("Enter")
    expect(bob.locator(".sidebar-results-status")).to_have_text("No messages found.")
    expect(results).to_have_count(0)
    box.fill("")
    expect(bob.locator(".sidebar-results")).to_be_hidden()
    expect(bob.locator(".sidebar-room-list")).to_be_visible()

    # A query of no words: the server's error, shown where results go.
    box.fill("!!!")
    box.press("Enter")
    expect(bob.locator(".sidebar-results-status")).to_have_text(
        "search: the query has no words"
    )
    expect(bob.locator(".sidebar-results-status")).to_have_class(
        "sidebar-results-status error"
    )

    # More than a page: "More" asks for the ones before the last result.
    in_thread(
        messages_create,
        room=random,
        username="alice",
        bodies=[f"release note {n}" for n in range(1, 26)],
    )
    box.fill("release")
    box.press("Enter")
    expect(results).to_have_count(20)
    expect(bob.locator(".sidebar-results-status")).to_have_text("20+ results")
    expect(results.first.locator(".search-result-body")).to_have_text("release note 25")
    bob.get_by_role("button", name="More").click()
    expect(results).to_have_count(25)
    expect(bob.locator(".sidebar-results-status")).to_have_text("25 results")
    expect(results.locator(".search-result-body")).to_have_text(
        [f"release note {n}" for n in range(25, 0, -1)]
    )
    expect(bob.get_by_role("button", name="More")).to_be_hidden()

    box.fill("deploy window")
    box.press("Enter")
    expect(results).to_have_count(1)
    expect(results.locator("a")).to_have_attribute("href", "/r/random/#m1")
    results.locator("a").click()
    expect(bob).to_have_url(f"{server.http_url}/r/random/#m1")
    test_browser.expect_online(bob)
    expect(sidebar_room(bob, "Random")).to_have_attribute("aria-current", "page")


def test_a_mention_while_hidden_raises_one_notification(server, sidebar_page):
    alice, bob = sidebar_page(), sidebar_page()
    bob.context.grant_permissions(["notifications"], origin=server.http_url)
    bob.add_init_script(HIDDEN_AND_RECORDING)
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    open_room(bob, server, "lobby")
    open_room(alice, server, "lobby")
    assert bob.evaluate("[document.hidden, Notification.permission]") == [
        True,
        "granted",
    ]
    # Granted already: nothing to offer.
    expect(bob.get_by_role("button", name="Enable notifications")).to_be_hidden()

    send(alice, "no mention here")
    send(alice, "@bob the build is red")
    expect(stored(bob).locator(".body")).to_have_text(
        ["no mention here", "@bob the build is red"]
    )
    bob.wait_for_function("window.notificationsMade.length >= 1")
    bob.wait_for_timeout(500)  # a second one would have come by now
    assert bob.evaluate("window.notificationsMade") == [
        {"title": "alice mentioned you in The Lobby", "body": "@bob the build is red"}
    ]

    # A direct message mentioning bob comes as a message and as a notification:
    # still one, and its body truncated.
    long_body = "@bob " + "x" * 300
    dm(alice, "bob", long_body, "dm-1")
    bob.wait_for_function("window.notificationsMade.length >= 2")
    bob.wait_for_timeout(500)
    made = bob.evaluate("window.notificationsMade")
    assert len(made) == 2, made
    assert made[1] == {
        "title": "alice sent you a message",
        "body": long_body[:139] + "…",
    }

    dm(alice, "bob", "plain and direct", "dm-2")
    bob.wait_for_function("window.notificationsMade.length >= 3")
    made = bob.evaluate("window.notificationsMade")
    assert made[2] == {"title": "alice sent you a message", "body": "plain and direct"}
    # Hidden, bob read nothing: the counts say so.
    expect(bob).to_have_title("(4) The Lobby · chatsite")


def test_at_phone_width_the_sidebar_folds_behind_a_rooms_button(server, sidebar_page):
    bob = sidebar_page()
    bob.set_viewport_size({"width": 390, "height": 844})
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    room_create(slug="random", title="Random")
    open_room(bob, server, "random")
    open_room(bob, server, "lobby")

    toggle = bob.get_by_role("button", name="Rooms")
    expect(toggle).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(bob.locator(".sidebar-room-list")).to_be_hidden()
    assert bob.evaluate("document.documentElement.scrollWidth") <= 390
    expect(bob.locator("#message-input")).to_be_visible()

    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(room_names(bob)).to_have_text(["The Lobby", "Random"])
    expect(bob.get_by_role("searchbox", name="Search messages")).to_be_visible()
    test_browser.screenshot(bob, "sidebar_phone.png")
    assert bob.evaluate("document.documentElement.scrollWidth") <= 390
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(bob.locator(".sidebar-room-list")).to_be_hidden()

    # Wide again: no button, the list beside the room.
    bob.set_viewport_size({"width": 1100, "height": 700})
    expect(toggle).to_be_hidden()
    expect(room_names(bob)).to_have_text(["The Lobby", "Random"])


def test_after_a_server_restart_the_sidebar_asks_again_and_joins_again(
    server, sidebar_page
):
    alice, bob = sidebar_page(), sidebar_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    random = room_create(slug="random", title="Random")
    open_room(bob, server, "random")
    open_room(bob, server, "lobby")
    open_room(alice, server, "random")
    expect(room_names(bob)).to_have_text(["The Lobby", "Random"])

    server.stop()
    expect(bob.locator("#connection-state")).to_have_attribute(
        "data-state", "reconnecting"
    )
    in_thread(
        messages_create, room=random, username="alice", bodies=["while you were out"]
    )
    server.start()  # the same port
    test_browser.expect_online(bob)
    test_browser.expect_online(alice)

    # Counted by the server: the sidebar asked `rooms` on the new socket.
    random_link = sidebar_room(bob, "Random")
    expect_counts(random_link, "1 unread", "1", None)
    expect(bob).to_have_title("(1) The Lobby · chatsite")
    # And joined the room again: a new message counts live.
    send(alice, "@bob and now")
    expect(stored(alice).locator(".body")).to_have_text(
        ["while you were out", "@bob and now"]
    )
    expect_counts(random_link, "2 unread, 1 mention", "2", "@1")
    expect(bob).to_have_title("(2) The Lobby · chatsite")


# Every error frame the page's socket receives, from the first one on.
RECORD_ERRORS = """
window.errorFrames = [];
document.addEventListener("chat:frame", (event) => {
  if (event.detail.type === "error") window.errorFrames.push(event.detail);
});
"""

# The time the sidebar may take to join the last of 40 rooms: 15 joins paced
# 500 ms apart, plus a 10 s pause after a rate_limited one, on a slow machine.
JOIN_ALL_MS = 45_000


def rooms_with_member(*, username, count):
    """Rooms ``room-01`` to ``room-<count>``, ``username`` a member of each.

    Each membership is newer than the one before: the sidebar lists the rooms
    from the last made to ``room-01``.
    """
    user = get_user_model().objects.get(username=username)
    for number in range(1, count + 1):
        room = services.room_create(slug=f"room-{number:02}", title=f"Room {number:02}")
        services.membership_add(room=room, user=user)


def forty_rooms_for_bob(server, sidebar_page):
    """alice, and bob in 40 rooms with the room list loaded on ``room-40``."""
    alice, bob = sidebar_page(), sidebar_page()
    bob.add_init_script(RECORD_ERRORS)
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    in_thread(rooms_with_member, username="bob", count=40)
    open_room(bob, server, "room-40")
    expect(room_names(bob)).to_have_text([f"Room {n:02}" for n in range(40, 0, -1)])
    return alice, bob


def expect_live_badge_in_the_last_room(alice, bob, server):
    """alice speaks in room-01, the 40th of bob's list, once bob's socket is in it."""
    open_room(alice, server, "room-01")
    # bob's sidebar joining room-01 puts him online there.
    expect(alice.locator("#online li")).to_have_text(
        ["alice", "bob"], timeout=JOIN_ALL_MS
    )
    last = sidebar_room(bob, "Room 01")
    expect_counts(last, None, None, None)
    send(alice, "@bob the fortieth room speaks")
    expect_counts(last, "1 unread, 1 mention", "1", "@1")
    expect(bob).to_have_title("(1) Room 40 · chatsite")
    expect(room_names(bob).first).to_have_text("Room 01")
    # Nothing on the page shows an error.
    expect(bob.locator("#status")).to_have_text("")
    expect(bob.locator("#banner")).to_be_hidden()
    test_browser.expect_online(bob)


def test_a_member_of_forty_rooms_gets_live_badges_from_the_last_of_them(
    server, sidebar_page
):
    alice, bob = forty_rooms_for_bob(server, sidebar_page)
    expect_live_badge_in_the_last_room(alice, bob, server)
    # 25 joins at once and the 15 others paced stay within 60 frames in 10 s.
    assert bob.evaluate("window.errorFrames") == []


@pytest.fixture
def tight_rate_server(transactional_db):
    """A server letting each user 30 database frames in 10 s (leases of 3)."""
    server = DaphneServer(extra_env={"CHAT_RATE_LIMIT": "30/10"}).start()
    yield server
    server.stop()


def test_a_join_refused_for_the_rate_limit_is_tried_again_after_retry_after(
    tight_rate_server, sidebar_page
):
    alice, bob = forty_rooms_for_bob(tight_rate_server, sidebar_page)
    expect_live_badge_in_the_last_room(alice, bob, tight_rate_server)
    # chat.js's join and history and 24 joins at once take 26 of the 30 frames,
    # 4 paced joins the rest; the next is refused, and no other join is sent
    # until its retry_after has passed: one refusal, then room-01 joined too.
    refusals = bob.evaluate(
        "window.errorFrames.map((f) => [f.code, f.retry_after, f.ref.split('-')[1]])"
    )
    assert refusals == [["rate_limited", 10, "join"]]
