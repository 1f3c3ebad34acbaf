"""The room page's online list in headless Chromium, in small and big rooms.

Up to 50 users online a room's changes come as one ``presence`` frame each;
above, as one ``presence_batch`` a second with the exact ``online_count``, and
``joined`` lists at most 100 names. The other users here are real WebSocket
clients (``chat.client.ChatClient``, API tokens) of the same daphne process.
They run in an event loop of a thread of their own: Playwright's sync API holds
the test thread's loop, and the sockets stay open while the page is checked.
"""

import asyncio
import json
import threading

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from chat import services
from tests import test_browser
from tests.clients import open_chat_client
from tests.test_browser import in_thread, open_room, room_create, sign_up

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# The browser, its pages and the server process, as in tests/test_browser.py.
browser = test_browser.browser
new_page = test_browser.new_page
server = test_browser.server

TIMEOUT = 15  # seconds for a socket to connect, join or leave


def users_with_keys(*, names):
    """New users named ``names`` and the key of an API token of each."""
    keys = {}
    for name in names:
        user = get_user_model().objects.create_user(username=name)
        keys[name] = services.api_token_create(user=user)[1]
    return keys


class Crowd:
    """Users in a room through ``ChatClient``s of their own: ``join``, ``leave``,
    ``close``. Each pings on its own (half the heartbeat) and does not reconnect.
    """

    def __init__(self, server, room):
        self.server = server
        self.room = room
        self.clients = {}  # username -> connected ChatClient that joined the room
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    async def _join(self, name, key):
        client = await open_chat_client(self.server, key, name=name, ordered=False)
        self.clients[name] = client
        joined = await client.join(self.room)
        assert joined["type"] == "joined", joined

    async def _join_all(self, keys):
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(self._join(n, k) for n, k in keys.items()))

    def join(self, keys):
        """Connect and join, all at once; back when every one has ``joined``."""
        self._call(self._join_all(keys))

    async def _leave_all(self, names, by_frame):
        async with asyncio.timeout(TIMEOUT):
            for name in names:
                client = self.clients.pop(name)
                if by_frame:
                    left = await client.leave(self.room)
                    assert left["type"] == "left", left
                await client.close()

    async def _settle(self, name, quiet):
        client = self.clients[name]
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    await client.next_event(timeout=quiet)
                except TimeoutError:
                    return

    def settle(self, quiet=1.5):
        """Back once the first client has had no frame for ``quiet`` seconds:
        the room's last presence_batch has gone out."""
        self._call(self._settle(next(iter(self.clients)), quiet))

    def leave(self, names):
        """Send ``leave`` (and then close the socket) for each of ``names``."""
        self._call(self._leave_all(names, by_frame=True))

    def close(self, names):
        """Close the sockets of ``names``: they go offline by disconnecting."""
        self._call(self._leave_all(names, by_frame=False))

    async def _shut(self):
        await asyncio.gather(*(c.close() for c in self.clients.values()))
        self.clients.clear()

    def shut(self):
        try:
            self._call(self._shut())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(TIMEOUT)


@pytest.fixture
def crowd(server):
    crowds = []

    def make(room):
        crowds.append(Crowd(server, room))
        return crowds[-1]

    yield make
    for each in crowds:
        each.shut()


def presence_frames_of(page):
    """The presence and presence_batch frames the page receives, kept up to date."""
    received = []

    def on_frame(payload):
        frame = json.loads(payload)
        if frame["type"] in ("presence", "presence_batch"):
            received.append(frame)

    page.on("websocket", lambda socket: socket.on("framereceived", on_frame))
    return received


def expect_online_list(page, names, count):
    """The page lists exactly ``names`` (sorted), counts ``count``, and says
    "and N more" for the users it has no name for."""
    expect(page.locator("#online-count")).to_have_text(str(count))
    expect(page.locator("#online li")).to_have_text(sorted(names))
    more = page.locator("#online-more")
    if count > len(names):
        expect(more).to_be_visible()
        expect(more).to_have_text(f"and {count - len(names)} more")
    else:
        expect(more).to_be_hidden()


def shown_names(page):
    return page.locator("#online li").all_text_contents()


def test_a_small_room_lists_and_counts_each_change(server, new_page, crowd):
    page = new_page()
    sign_up(page, server, "alice")
    room_create(slug="hall", title="The Hall")
    frames = presence_frames_of(page)
    open_room(page, server, "hall")
    expect_online_list(page, ["alice"], 1)

    names = [f"u{n:02}" for n in range(1, 13)]
    keys = in_thread(users_with_keys, names=names)
    hall = crowd("hall")
    hall.join(keys)
    expect_online_list(page, ["alice", *names], 13)

    hall.close(["u03", "u07"])
    hall.leave(["u11"])
    staying = [name for name in names if name not in ("u03", "u07", "u11")]
    expect_online_list(page, ["alice", *staying], 10)

    hall.join({"u07": keys["u07"]})
    expect_online_list(page, ["alice", *staying, "u07"], 11)
    # At most 50 online: only per-user frames, one per change.
    assert {frame["type"] for frame in frames} == {"presence"}
    assert len(frames) == 12 + 3 + 1


def test_past_50_online_the_page_follows_the_batches(server, new_page, crowd):
    page = new_page()
    sign_up(page, server, "alice")
    room_create(slug="arena", title="The Arena")
    frames = presence_frames_of(page)
    open_room(page, server, "arena")
    expect_online_list(page, ["alice"], 1)

    names = [f"u{n:02}" for n in range(59)]
    keys = in_thread(users_with_keys, names=names)
    arena = crowd("arena")
    arena.join(keys)
    online = ["alice", *names]
    expect_online_list(page, online, 60)
    batches = [frame for frame in frames if frame["type"] == "presence_batch"]
    assert batches, "no presence_batch reached the page"
    assert batches[-1]["online_count"] == 60

    # 60 -> 52, every change batched.
    before = len(frames)
    gone = ["u00", "u13", "u27", "u41", "u50", "u52", "u55", "u58"]
    arena.close(gone[:5])
    arena.leave(gone[5:])
    online = [name for name in online if name not in gone]
    expect_online_list(page, online, 52)
    assert {frame["type"] for frame in frames[before:]} == {"presence_batch"}

    # 52 -> 45: the first two changes batched, the rest one by one (at most 50).
    before = len(frames)
    gone = ["u01", "u02", "u03", "u30", "u31", "u56", "u57"]
    arena.close(gone)
    online = [name for name in online if name not in gone]
    expect_online_list(page, online, 45)
    kinds = [frame["type"] for frame in frames[before:]]
    assert "presence_batch" in kinds and "presence" in kinds, kinds

    # And back up by per-user frames.
    back = {name: keys[name] for name in ("u00", "u02", "u58")}
    arena.join(back)
    expect_online_list(page, [*online, *back], 48)


def test_more_online_than_joined_lists_shows_the_names_it_knows_and_the_rest_counted(
    server, new_page, crowd
):
    names = [f"u{n:03}" for n in range(112)]
    keys = in_thread(users_with_keys, names=names)
    room_create(slug="stadium", title="The Stadium")
    stadium = crowd("stadium")
    stadium.join({name: keys[name] for name in names[:110]})
    stadium.settle()  # no batch naming them reaches the page after its joined

    page = new_page()
    sign_up(page, server, "bob")
    frames = presence_frames_of(page)
    open_room(page, server, "stadium")
    # joined lists 100 of the 111 online: the page shows those and counts the rest.
    expect(page.locator("#online li")).to_have_count(100)
    expect(page.locator("#online-count")).to_have_text("111")
    expect(page.locator("#online-more")).to_have_text("and 11 more")
    known = shown_names(page)
    assert "bob" in known
    assert set(known) <= {"bob", *names[:110]}
    unknown = sorted(set(names[:110]) - set(known))
    assert len(unknown) == 11

    # Three it knows and three it does not go; two come: 107 online.
    gone_known = [name for name in known if name != "bob"][:3]
    stadium.close([*gone_known, *unknown[:2]])
    stadium.leave(unknown[2:3])
    stadium.join({name: keys[name] for name in names[110:]})
    known = [name for name in known if name not in gone_known] + names[110:]
    expect_online_list(page, known, 107)
    assert len(known) == 99  # "and 8 more"
    assert {frame["type"] for frame in frames} == {"presence_batch"}
