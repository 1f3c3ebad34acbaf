"""The room page's reconnect delays in headless Chromium: full jitter, and a
first retry after a 1001 spread over a short window.

The delays come from ``window.chatsite.reconnectDelay(attempt, closeCode,
random)``, evaluated in the page with fixed random values. The last test runs
six pages through a deploy: their server goes away with 1001 while the next
one already serves the same port, as behind a load balancer.
"""

import asyncio
import json
import socket
import threading
import time

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from chat import services
from tests import test_browser
from tests.clients import open_chat_client
from tests.servers import DaphneServer
from tests.test_browser import (
    expect_online,
    in_thread,
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


class Balancer:
    """A port of our own that hands each connection to the backend of the
    moment, bytes both ways, as a load balancer does: its backend's server can
    be replaced while the pages keep the same address."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.backend = None  # a DaphneServer
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def http_url(self):
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.backend.port))
            except OSError:
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pipe, args=(source, sink), daemon=True
                ).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # Either side closing closes both; each thread closes its source.
            for each in (source, sink):
                try:
                    each.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            source.close()

    def close(self):
        self.listener.close()


def deploy_server():
    # Six accounts from one address: past the sign-up page's default 5 an hour.
    return DaphneServer(extra_env={"CHAT_SIGNUP_RATE": "100/3600"}, verbosity=0)


@pytest.fixture
def balancer(transactional_db):
    balancer = Balancer()
    yield balancer
    balancer.close()


@pytest.fixture
def old_server(balancer):
    server = deploy_server().start()
    balancer.backend = server
    yield server
    server.stop()


@pytest.fixture
def new_server(transactional_db):
    server = deploy_server()
    yield server
    server.stop()


# Page i's Math.random() always says RANDOMS[i]: its first retry after a 1001
# waits exactly DEPLOY_DELAYS_MS[i] (floor(random * 2000)), 220 ms apart.
DEPLOY_DELAYS_MS = [700, 920, 1140, 1360, 1580, 1800]
RANDOMS = [(ms + 0.5) / FIRST_AFTER_1001_MS for ms in DEPLOY_DELAYS_MS]
LATE_MS = 150  # how late a timer and a local handshake may be, at most

# Each WebSocket the page makes is logged: when it was made, opened, closed.
RECORD_SOCKETS = """
Math.random = () => %r;
window.sockets = [];
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) {
    super(...args);
    const entry = { created: Date.now(), opened: null, closed: null, code: null };
    window.sockets.push(entry);
    this.addEventListener("open", () => (entry.opened = Date.now()));
    this.addEventListener("close", (event) => {
      entry.closed = Date.now();
      entry.code = event.code;
    });
  }
};
"""


def frames_of(page):
    """Per WebSocket of the page, in order: [(direction, frame), ...]."""
    per_socket = []

    def on_socket(ws):
        frames = []
        per_socket.append(frames)
        ws.on("framesent", lambda payload: frames.append(("sent", json.loads(payload))))
        ws.on(
            "framereceived",
            lambda payload: frames.append(("received", json.loads(payload))),
        )

    page.on("websocket", on_socket)
    return per_socket


def messages_store(*, room, by):
    """Store one message by each of ``by`` (username -> body), in one commit."""
    users = {user.username: user for user in get_user_model().objects.all()}
    requests = [
        services.SendRequest(room, users[name], body, f"gap-{n}")
        for n, (name, body) in enumerate(by.items())
    ]
    services.message_create_many(requests=requests)


def key_of_new_user(*, username):
    user = get_user_model().objects.create_user(username=username)
    return services.api_token_create(user=user)[1]


def warm_up(server, *, key):
    """One socket through a join with since and out: the process's first
    handshake and recovery are slower than the rest.

    A ``ChatClient`` in an event loop of a thread of its own (Playwright's sync
    API holds the test thread's).
    """

    async def join_and_recover():
        client = await open_chat_client(server, key, name="warm-up")
        try:
            await client.send({"type": "join", "room": "lobby", "since": 0})
            while (await client.next_frame(10))["type"] != "recovered":
                pass
        finally:
            await client.close()

    in_thread(lambda: asyncio.run(join_and_recover()))


def test_pages_dropped_by_a_deploy_come_back_apart_and_recover_what_they_missed(
    balancer, old_server, new_server, new_page
):
    names = [f"user{n}" for n in range(len(RANDOMS))]
    pages, frames = [], []
    for name, random in zip(names, RANDOMS, strict=True):
        page = new_page()
        page.add_init_script(RECORD_SOCKETS % random)
        sign_up(page, balancer, name)
        frames.append(frames_of(page))
        pages.append(page)
    room = room_create(slug="lobby", title="The Lobby")
    for page in pages:
        open_room(page, balancer, "lobby")
    send(pages[0], "before 1")
    expect(stored(pages[0]).locator(".body")).to_have_text(["before 1"])
    send(pages[1], "before 2")
    for page in pages:
        expect(stored(page).locator(".body")).to_have_text(["before 1", "before 2"])

    # The deploy: the next process serves the port first (warmed up, as a
    # health check would), then the old one goes away with 1001 and exits
    # after its grace.
    new_server.start()
    warm_up(new_server, key=in_thread(key_of_new_user, username="probe"))
    balancer.backend = new_server
    stopping = threading.Thread(target=old_server.stop)
    stopping.start()
    closed = "() => window.sockets[0].closed !== null"
    deadline = time.monotonic() + 10
    while not all(page.evaluate(closed) for page in pages):
        assert time.monotonic() < deadline, "the pages kept their sockets"
    # Stored while no page has a socket (the first retries in 700 ms): only
    # `since` can tell them.
    missed = {"user2": "missed 1", "user3": "missed 2", "user4": "missed 3"}
    in_thread(messages_store, room=room, by=missed)
    stored_at = time.time() * 1000
    stopping.join()

    for page in pages:
        expect_online(page)
    records = [page.evaluate("() => window.sockets") for page in pages]

    # (a) One retry each, the first, at its own delay in the 1001 window.
    for name, delay, sockets in zip(names, DEPLOY_DELAYS_MS, records, strict=True):
        assert len(sockets) == 2, (name, sockets)
        dropped, back = sockets
        assert dropped["code"] == 1001, (name, sockets)
        assert back["closed"] is None and back["opened"] is not None, (name, sockets)
        waited = back["created"] - dropped["closed"]
        assert delay <= waited < delay + LATE_MS, (name, delay, sockets)
        assert waited < FIRST_AFTER_1001_MS, (name, sockets)
        assert back["opened"] - back["created"] < LATE_MS, (name, sockets)
    opened = sorted(sockets[1]["opened"] for sockets in records)
    gaps = [later - earlier for earlier, later in zip(opened, opened[1:], strict=False)]
    assert min(gaps) > 100, opened  # 220 ms apart, give or take the timers
    # The gap was real: every message was stored before any page came back.
    assert stored_at < min(sockets[1]["created"] for sockets in records)

    # (b) Each page joined again with since = 2 and got exactly 3, 4, 5, once.
    expected = ["before 1", "before 2", *missed.values()]
    for page, per_socket in zip(pages, frames, strict=True):
        expect(stored(page).locator(".body")).to_have_text(expected)
        assert seqs(page) == ["1", "2", "3", "4", "5"]
        assert len(per_socket) == 2
        first, again = ([f for way, f in each if way == "sent"] for each in per_socket)
        assert [f.get("since") for f in first if f["type"] == "join"] == [None]
        assert [f.get("since") for f in again if f["type"] == "join"] == [2]
        assert not [f for f in again if f["type"] == "history"], again
        received = [frame for way, frame in per_socket[1] if way == "received"]
        kinds = [f["type"] for f in received if f["type"] in ("message", "recovered")]
        assert kinds == ["message", "message", "message", "recovered"], received
        got = [f["seq"] for f in received if f["type"] == "message"]
        assert got == [3, 4, 5]

    # And live again, on the new process, for every page.
    send(pages[5], "after")
    for page in pages:
        expect(stored(page).locator(".body")).to_have_text([*expected, "after"])
        assert seqs(page) == ["1", "2", "3", "4", "5", "6"]
