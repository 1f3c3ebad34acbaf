"""The room page as a person uses it, in headless Chromium: phone sizes, the
keyboard, the states a socket can end in, composing and reading.

Moderation happens in this process through the services, and reaches the
page's socket in a daphne process over a redis-server of the test's own, as it
would in production. Browser, server and helpers as in ``tests/test_browser.py``.
Set ``CHAT_SCREENSHOTS=docs/screenshots`` to refresh the README's screenshots.
"""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from playwright.sync_api import expect

from chat import services
from chat.models import Message, Room
from tests import test_browser, test_browser_moderation
from tests.test_browser import (
    TIMEOUT_MS,
    confirm_dialog,
    expect_online,
    in_thread,
    open_room,
    room_create,
    screenshot,
    send,
    sign_up,
    stored,
)
from tests.test_browser_team import two_in_lobby

pytestmark = [
    pytest.mark.browser,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True),
]

browser = test_browser.browser

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1100, "height": 700}


# A daphne on a Redis of its own, as for the moderation banners.
server = test_browser_moderation.server


@pytest.fixture
def new_page(browser):
    """A page in a context of its own (``viewport``), or in ``like``'s context's
    copy: the same session cookie, as a second browser of the same user.

    A script error or a failed request (4xx, 5xx) of any page fails the test,
    but for those listed in the page's ``expected_failures``.
    """
    errors = []

    def make(viewport=DESKTOP, like=None):
        context = browser.new_context(viewport=viewport)
        context.set_default_timeout(TIMEOUT_MS)
        if like is not None:
            context.add_cookies(like.context.cookies())
        page = context.new_page()
        page.expected_failures = set()
        page.on("pageerror", lambda error: errors.append(str(error)))

        def failed(response):
            path = response.url.split("//", 1)[-1].split("/", 1)[-1]
            if response.status >= 400 and f"/{path}" not in page.expected_failures:
                errors.append(f"{response.status} {response.url}")

        page.on("response", failed)
        return page

    yield make
    assert errors == []


def user_get(username):
    return get_user_model().objects.get(username=username)


def messages_create(*, slug, username, bodies, at=None):
    room, author = Room.objects.get(slug=slug), user_get(username)
    for number, body in enumerate(bodies):
        message, _ = services.message_create(
            room=room, author=author, body=body, client_msg_id=f"{username}-{number}"
        )
        if at is not None:
            Message.objects.filter(pk=message.pk).update(created_at=at)


def overflow(page):
    """How far the page is wider than its window (0: nothing overflows)."""
    return page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )


def inside_window(page, locator):
    box = locator.bounding_box()
    width = page.viewport_size["width"]
    assert box is not None
    assert box["x"] >= 0 and box["x"] + box["width"] <= width, box


def test_at_phone_sizes_nothing_overflows_and_every_control_is_reachable(
    server, new_page
):
    alice = new_page(viewport=PHONE)
    sign_up(alice, server, "alice")
    room_create(slug="lobby", title="The Lobby")
    in_thread(
        messages_create,
        slug="lobby",
        username="alice",
        bodies=[
            "a long word: " + "x" * 200,
            "a long link: https://example.com/" + "path/" * 40,
            "`" + "code" * 60 + "`",
        ],
    )
    open_room(alice, server, "lobby")
    send(alice, "my own message")
    own = stored(alice).last
    expect(own.locator(".body")).to_have_text("my own message")

    for width in (390, 320):
        alice.set_viewport_size({"width": width, "height": 844})
        assert overflow(alice) == 0
        # The people panel and the room list fold behind buttons in the header.
        expect(alice.locator("#people")).to_be_hidden()
        expect(alice.locator("#room-sidebar .sidebar-panel")).to_be_hidden()
        timeline = alice.locator("#timeline").bounding_box()
        assert timeline["width"] >= width - 20
        for control in (
            own.get_by_role("button", name="Edit"),
            own.get_by_role("button", name="Delete"),
            alice.locator("#send-button"),
            alice.locator("#attach-button"),
            alice.locator("#people-toggle"),
            alice.locator("#room-sidebar .sidebar-toggle"),
        ):
            expect(control).to_be_visible()
            inside_window(alice, control)
            # Its label fits: a squeezed button clips "Send" to "Sen".
            assert control.evaluate("e => e.scrollWidth - e.clientWidth") == 0
        # A time stays on one line (the first message's: grouped ones show none).
        first_time = stored(alice).first.locator(".meta time")
        assert first_time.evaluate("t => t.getClientRects().length") == 1
    screenshot(alice, "room_phone_320.png")

    alice.set_viewport_size(PHONE)
    toggle = alice.locator("#people-toggle")
    expect(toggle).to_have_text("People 1")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    people = alice.locator("#people")
    expect(people).to_be_visible()
    inside_window(alice, people)
    expect(alice.locator("#online li")).to_have_text(["alice"])
    expect(alice.locator("#members li")).to_have_text(["alice"])
    screenshot(alice, "room_phone_people.png")
    alice.keyboard.press("Escape")
    expect(people).to_be_hidden()
    expect(toggle).to_be_focused()
    assert overflow(alice) == 0
    screenshot(alice, "room_phone.png")


def focused(page):
    return page.evaluate(
        "(() => { const e = document.activeElement;"
        " return [e.id, e.textContent.trim(), e.closest('.message')?.dataset.seq"
        " || null, getComputedStyle(e.closest('.actions') || e).opacity]; })()"
    )


def test_the_keyboard_reaches_every_action_and_edits_in_place(server, new_page):
    alice, bob = new_page(), new_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    # One more than a page: "Load older" is there.
    in_thread(
        messages_create,
        slug="lobby",
        username="bob",
        bodies=[f"older {n}" for n in range(51)],
    )
    open_room(alice, server, "lobby")
    # The message box is focused on load.
    expect(alice.locator("#message-input")).to_be_focused()
    send(alice, "mine")
    expect(stored(alice).last.locator(".body")).to_have_text("mine")

    # Tab from the timeline to my message's actions: Edit, then Delete, each
    # visible while it has the focus. "Load older" never takes the focus (it
    # would jump the list to the top).
    alice.locator("#timeline").focus()
    seen = []
    for _ in range(400):
        alice.keyboard.press("Tab")
        seen.append(focused(alice))
        if seen[-1][1:3] == ["Edit", "52"]:
            break
    assert seen[-1] == ["", "Edit", "52", "1"], seen[-5:]
    assert all(entry[0] != "load-older" for entry in seen)
    alice.keyboard.press("Tab")
    assert focused(alice) == ["", "Delete", "52", "1"]
    # Bob's messages offer no Edit.
    assert [entry for entry in seen if entry[1] == "Edit" and entry[2] != "52"] == []

    # Enter on Edit: the body becomes a box; Escape puts it back unchanged and
    # the focus back on Edit.
    alice.keyboard.press("Shift+Tab")
    alice.keyboard.press("Enter")
    box = stored(alice).last.get_by_role("textbox", name="Edit your message")
    expect(box).to_be_focused()
    box.press("Escape")
    expect(box).to_have_count(0)
    expect(stored(alice).last.locator(".body")).to_have_text("mine")
    assert focused(alice)[1:3] == ["Edit", "52"]

    # Up-arrow in the empty message box edits my last message; Enter saves.
    alice.locator("#message-input").focus()
    alice.keyboard.press("ArrowUp")
    expect(box).to_be_focused()
    expect(box).to_have_value("mine")
    box.fill("mine, edited")
    box.press("Enter")
    expect(box).to_have_count(0)
    expect(stored(alice).last.locator(".body")).to_have_text("mine, edited")
    expect(stored(alice).last.locator(".edited")).to_have_text("(edited)")
    expect(alice.locator("#message-input")).to_be_focused()

    # Delete asks in a modal dialog, Cancel focused; Escape keeps the message.
    stored(alice).last.get_by_role("button", name="Delete").focus()
    alice.keyboard.press("Enter")
    dialog = alice.get_by_role("dialog")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    alice.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(stored(alice).last.locator(".body")).to_have_text("mine, edited")
    stored_bodies = in_thread(
        lambda: list(Message.objects.filter(seq=52).values_list("body", "deleted_at"))
    )
    assert stored_bodies == [("mine, edited", None)]

    # Others' messages are read out (aria-live), one's own are not.
    open_room(bob, server, "lobby")
    send(bob, "hello from bob")
    expect(alice.locator("#announce")).to_have_text("bob: hello from bob")


def test_a_site_ban_is_explained_live_on_a_refused_reconnect_and_after_reload(
    server, new_page
):
    bob = new_page()
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    open_room(bob, server, "lobby")
    until = timezone.now() + timedelta(days=2)

    ban = in_thread(
        lambda: services.user_ban(user=user_get("bob"), reason="spam", expires_at=until)
    )

    # Live: the close says why, /api/me says until when.
    banner = bob.locator("#banner-text")
    expect(banner).to_contain_text("You are banned from this site until ", timeout=2000)
    expect(banner).to_contain_text(": spam")
    expect(bob.locator("#banner")).to_have_attribute("data-kind", "banned")
    expect(bob.locator("#message-input")).to_be_disabled()
    local_until = bob.evaluate(
        "iso => new Date(iso).toLocaleString([], "
        "{dateStyle: 'medium', timeStyle: 'short'})",
        until.isoformat(),
    )
    expect(banner).to_have_text(
        f"You are banned from this site until {local_until}: spam"
    )
    screenshot(bob, "banned_live.png")

    # A refused handshake (the page was open while the ban was made): the
    # page asks the HTTP side why and says it.
    in_thread(lambda: services.ban_lift(ban=ban))
    bob.reload()
    expect_online(bob)
    server.stop()
    expect(bob.locator("#connection-state")).to_have_attribute(
        "data-state", "reconnecting"
    )
    in_thread(
        lambda: services.user_ban(
            user=user_get("bob"), reason="flood", expires_at=until
        )
    )
    server.start()
    expect(banner).to_have_text(
        f"You are banned from this site until {local_until}: flood"
    )
    expect(bob.locator("#connection-state")).to_have_attribute("data-state", "offline")

    # After a reload: the site's pages say it too, with a 403.
    bob.expected_failures |= {"/r/lobby/", "/"}
    answer = bob.goto(f"{server.http_url}/r/lobby/")
    assert answer.status == 403
    expect(bob.locator("main")).to_contain_text("You are banned from this site")
    expect(bob.locator("main")).to_contain_text("flood")
    screenshot(bob, "banned_page.png")
    assert bob.goto(f"{server.http_url}/").status == 403


def test_signing_out_in_one_browser_ends_the_sessions_socket_in_another(
    server, new_page
):
    first = new_page()
    sign_up(first, server, "alice")
    room_create(slug="lobby", title="The Lobby")
    second = new_page(like=first)  # the same session, in another browser
    open_room(first, server, "lobby")
    open_room(second, server, "lobby")

    first.get_by_role("button", name="Sign out").click()
    expect(first).to_have_url(f"{server.http_url}/accounts/login/")

    banner = second.locator("#banner-text")
    expect(banner).to_have_text("You signed out of this session.", timeout=2000)
    expect(second.locator("#banner")).to_have_attribute("data-kind", "signed-out")
    expect(second.locator("#message-input")).to_be_disabled()
    link = second.locator("#banner-link")
    expect(link).to_have_text("Sign in")
    expect(link).to_have_attribute("href", "/accounts/login/?next=%2Fr%2Flobby%2F")
    expect(second.locator("#connection-state")).to_have_attribute(
        "data-state", "offline"
    )


def test_composing_counts_near_the_limit_and_keeps_what_was_typed(server, new_page):
    alice = new_page()
    sign_up(alice, server, "alice")
    room = room_create(slug="lobby", title="The Lobby")
    open_room(alice, server, "lobby")
    box, count = alice.locator("#message-input"), alice.locator("#composer-count")

    alice.keyboard.insert_text("é" * 3499)  # a paste: code points are counted
    expect(count).to_be_hidden()
    alice.keyboard.insert_text("é")
    expect(count).to_be_visible()
    expect(count).to_have_text("3500 / 4000 characters")
    box.fill("")
    box.focus()
    alice.keyboard.insert_text("y" * 5000)
    expect(count).to_have_text("5000 / 4000 characters: 1000 too many")
    expect(box).to_have_attribute("aria-invalid", "true")
    expect(alice.locator("#send-button")).to_be_disabled()
    box.press("Enter")
    # Nothing sent, nothing cut: the text waits to be shortened.
    expect(alice.locator("#messages .message")).to_have_count(0)
    assert len(box.input_value()) == 5000
    screenshot(alice, "composer_over.png")

    box.fill("    indented code\n        more")
    box.press("Enter")
    expect(stored(alice)).to_have_count(1)
    expect(count).to_be_hidden()
    bodies = in_thread(lambda: list(room.messages.values_list("body", flat=True)))
    assert bodies == ["    indented code\n        more"]
    expect(stored(alice).locator(".body")).to_have_text(
        "    indented code\n        more"
    )


def test_messages_render_markdown_lite_and_nothing_else(server, new_page):
    alice, bob = two_in_lobby(server, new_page)
    text = (
        "see https://example.com/a?b=1&c=2, **bold** *em* `x<y`"
        " <img src=x onerror=alert(1)> [no](javascript:alert(1))"
    )
    send(alice, text)
    send(alice, "```\nfor x in y:\n    <b>print(x)</b>\n```")
    send(alice, "שלום עולם")

    first, code, hebrew = (
        bob.locator(f'#messages .message[data-seq="{n}"] .body') for n in (1, 2, 3)
    )
    link = first.locator("a")
    expect(link).to_have_count(1)
    expect(link).to_have_text("https://example.com/a?b=1&c=2")
    expect(link).to_have_attribute("href", "https://example.com/a?b=1&c=2")
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(link).to_have_attribute("target", "_blank")
    expect(first.locator("strong")).to_have_text("bold")
    expect(first.locator("em")).to_have_text("em")
    expect(first.locator("code")).to_have_text("x<y")
    expect(first).to_have_text(
        "see https://example.com/a?b=1&c=2, bold em x<y"
        " <img src=x onerror=alert(1)> [no](javascript:alert(1))"
    )
    expect(code.locator("pre code")).to_have_text("for x in y:\n    <b>print(x)</b>")
    expect(bob.locator("#messages img, #messages b")).to_have_count(0)
    assert bob.evaluate("typeof window.alerted") == "undefined"
    for body in (first, code, hebrew):
        expect(body).to_have_attribute("dir", "auto")
    assert hebrew.evaluate("b => getComputedStyle(b).direction") == "rtl"
    assert first.evaluate("b => getComputedStyle(b).direction") == "ltr"
    screenshot(bob, "room_desktop.png")


def test_reading_groups_dates_an_empty_room_and_new_messages_below(server, new_page):
    alice, bob = new_page(), new_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    room_create(slug="lobby", title="The Lobby")
    open_room(alice, server, "lobby")
    expect(alice.locator("#empty-room")).to_have_text("No messages yet. Say hello!")
    expect(alice.locator("#empty-room")).to_be_visible()
    send(alice, "first")
    expect(alice.locator("#empty-room")).to_be_hidden()

    yesterday = timezone.now() - timedelta(days=1)
    in_thread(
        messages_create,
        slug="lobby",
        username="bob",
        bodies=[f"old {n}" for n in range(3)],
        at=yesterday.replace(hour=12),
    )
    in_thread(
        messages_create,
        slug="lobby",
        username="alice",
        bodies=[f"today {n}" for n in range(70)],
    )
    open_room(bob, server, "lobby")
    # Yesterday's messages are beyond the first page: scroll up for them.
    expect(stored(bob)).to_have_count(50)
    first_shown = stored(bob).first
    expect(first_shown.locator(".body")).to_have_text("today 20")
    # Scrolled to the top: where the first message is then, before the older
    # page comes (the scroll event that asks for it runs after this script).
    top_before = bob.locator("#timeline").evaluate(
        "t => { t.scrollTop = 0; const body = t.querySelector('.message .body');"
        " return body.getBoundingClientRect().y; }"
    )
    expect(stored(bob)).to_have_count(74)
    # Your place is kept: the text that was on top stays where it was (its
    # message loses its name line, grouped now under the one before it).
    after = bob.locator('#messages .message[data-seq="25"] .body').bounding_box()["y"]
    assert abs(after - top_before) <= 2, (top_before, after)

    separators = bob.locator("#messages .day-separator")
    expect(separators).to_have_text(["Today", "Yesterday", "Today"])
    # first (alice, today), old 0-2 (bob, yesterday), today 0-69 (alice, today).
    grouped = stored(bob).evaluate_all(
        "items => items.map(i => i.classList.contains('grouped'))"
    )
    assert grouped == [False, False, True, True, False] + [True] * 69

    # Scrolled up, a new message below says so; the button jumps down.
    bob.locator("#timeline").evaluate("t => { t.scrollTop = 0; }")
    jump = bob.locator("#jump-latest")
    expect(jump).to_be_hidden()
    send(alice, "news")
    send(alice, "more news")
    expect(jump).to_have_text("2 new messages ↓")
    screenshot(bob, "jump_latest.png")
    jump.click()
    expect(jump).to_be_hidden()
    expect(stored(bob).last.locator(".body")).to_have_text("more news")
    expect(stored(bob).last).to_be_in_viewport()
    # At the bottom, new messages just show.
    send(alice, "latest")
    expect(stored(bob).last.locator(".body")).to_have_text("latest")
    expect(stored(bob).last).to_be_in_viewport()
    expect(jump).to_be_hidden()


def test_a_closed_room_reads_only_and_reopening_makes_it_writable(server, new_page):
    alice = new_page()
    sign_up(alice, server, "alice")
    room = room_create(slug="lobby", title="The Lobby")
    open_room(alice, server, "lobby")
    send(alice, "before")
    expect(stored(alice)).to_have_count(1)

    in_thread(services.room_close, room=room, reason="maintenance")

    banner = alice.locator("#banner-text")
    expect(banner).to_have_text(
        "This room was closed: maintenance."
        " You can read it, but it takes no new messages."
    )
    expect(alice.locator("#banner")).to_have_attribute("data-kind", "closed")
    expect(alice.locator("#message-input")).to_be_disabled()
    expect(stored(alice).locator(".body")).to_have_text(["before"])
    screenshot(alice, "closed.png")

    in_thread(services.room_reopen, room=room)

    expect(alice.locator("#banner")).to_be_hidden()
    expect(alice.locator("#message-input")).to_be_enabled()
    send(alice, "after")
    expect(stored(alice).locator(".body")).to_have_text(["before", "after"])
    bodies = in_thread(lambda: list(room.messages.values_list("body", flat=True)))
    assert bodies == ["before", "after"]


def test_a_kick_and_a_mute_are_banners_with_their_reason(server, new_page):
    alice = new_page()
    alice.add_init_script(
        "document.addEventListener('chat:frame', e => {"
        " if (e.detail.type === 'hello')"
        " window.connectionId = e.detail.connection_id; })"
    )
    sign_up(alice, server, "alice")
    room = room_create(slug="lobby", title="The Lobby")
    open_room(alice, server, "lobby")
    connection_id = alice.evaluate("window.connectionId")

    in_thread(
        services.connection_disconnect, connection_id=connection_id, reason="cool down"
    )

    banner = alice.locator("#banner-text")
    expect(banner).to_have_text("A moderator disconnected you: cool down.")
    expect(alice.locator("#banner")).to_have_attribute("data-kind", "kicked")
    expect(alice.locator("#message-input")).to_be_disabled()
    alice.get_by_role("button", name="Reconnect").click()
    expect_online(alice)
    expect(alice.locator("#banner")).to_be_hidden()

    in_thread(
        lambda: services.user_mute(user=user_get("alice"), room=room, reason="too loud")
    )
    send(alice, "can I talk?")
    expect(banner).to_have_text("You are muted in this room: too loud")
    expect(alice.locator("#banner")).to_have_attribute("data-kind", "muted")
    expect(alice.locator("#messages .message.failed .failure")).to_have_text(
        "not sent: you are muted in 'lobby': too loud"
    )
    expect(alice.locator("#messages .message.failed .body")).to_have_text("can I talk?")

    # A room ban takes the page out of the room; after a reload the room's
    # page says why (not that the room is private).
    in_thread(
        lambda: services.room_ban(user=user_get("alice"), room=room, reason="off topic")
    )
    expect(banner).to_have_text(
        "You were removed from this room: banned from the room: off topic"
    )
    expect(alice.locator("#banner")).to_have_attribute("data-kind", "removed")
    expect(alice.locator("#message-input")).to_be_disabled()
    alice.expected_failures.add("/r/lobby/")
    assert alice.goto(f"{server.http_url}/r/lobby/").status == 403
    expect(alice.locator("main h1")).to_have_text("You are banned from The Lobby")
    expect(alice.locator("main")).to_contain_text("Reason: off topic")
    expect(alice.locator("main")).to_contain_text("Banned with no end date.")


def test_owners_invite_members_see_who_is_online_and_leave(server, new_page):
    alice, bob = new_page(), new_page()
    sign_up(alice, server, "alice")
    sign_up(bob, server, "bob")
    alice.locator("#id_slug").fill("secret")
    alice.locator("#id_title").fill("Secret")
    alice.locator("#id_is_private").check()
    alice.get_by_role("button", name="Create room").click()
    expect_online(alice)

    # To outsiders a private room is not there at all.
    bob.expected_failures.add("/r/secret/")
    bob.expected_failures.add("/r/no-such-room/")
    assert bob.goto(f"{server.http_url}/r/no-such-room/").status == 404
    unknown = bob.locator("main").inner_text()
    assert bob.goto(f"{server.http_url}/r/secret/").status == 404
    assert bob.locator("main").inner_text() == unknown

    expect(alice.locator("#members li")).to_have_text(["alice"])
    invite = alice.locator("#invite-input")
    alice.expected_failures.add("/api/rooms/secret/members")
    invite.fill("nobody")
    invite.press("Enter")
    expect(alice.locator("#invite-status")).to_have_text("no user 'nobody'")
    invite.fill("bob")
    invite.press("Enter")
    expect(alice.locator("#invite-status")).to_have_text("bob is now a member.")
    expect(alice.locator("#members li")).to_have_text(["alice", "bob"])
    expect(alice.locator("#members li.online")).to_have_text(["alice"])

    open_room(bob, server, "secret")
    expect(bob.locator("#invite-form")).to_be_hidden()  # bob did not create it
    expect(alice.locator("#members li.online")).to_have_text(
        ["alice", "bob"], timeout=12_000
    )
    bob.get_by_role("button", name="Leave room").click()
    confirm_dialog(
        bob, "Leave this room? You need an invitation to come back.", "Leave"
    )
    expect(bob).to_have_url(f"{server.http_url}/")
    assert bob.goto(f"{server.http_url}/r/secret/").status == 404
    members = in_thread(
        lambda: list(
            Room.objects.get(slug="secret").memberships.values_list(
                "user__username", flat=True
            )
        )
    )
    assert members == ["alice"]


def test_pages_have_the_site_name_a_favicon_and_no_failed_request(server, new_page):
    alice = new_page()
    sign_up(alice, server, "alice")
    room_create(slug="lobby", title="The Lobby")
    expect(alice).to_have_title("Rooms · chatsite")
    open_room(alice, server, "lobby")
    expect(alice).to_have_title("The Lobby · chatsite")
    expect(alice.locator(".brand")).to_have_text("chatsite")
    icon = alice.locator("link[rel=icon]")
    href = icon.get_attribute("href")
    assert alice.request.get(f"{server.http_url}{href}").status == 200
    favicon = alice.request.get(f"{server.http_url}/favicon.ico")
    assert favicon.status == 200
    assert favicon.headers["content-type"] == "image/svg+xml"
