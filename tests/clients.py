"""Real sockets for the tests: ``chat.client.ChatClient``, read in order.

Tests that talk to a running server (daphne, nginx in front of it) open their
sockets with ``open_chat_client`` or the ``chat_client`` fixture: a
``ChatClient`` with ``ordered=True`` (every frame read in the order it came)
and no reconnect unless asked, whose failures carry the server's log.
"""

import re

from chat.client import ChatClient

# A connection id: the process id (8 hex digits), a dash, a number from 1.
CONNECTION_ID = re.compile(r"([0-9a-f]{8})-[1-9][0-9]*")
LOG_TAIL = 6000


def server_log(server):
    """``explain`` for a client of ``server``: the tail of its log."""
    return lambda: f"--- server log ---\n{server.output()[-LOG_TAIL:]}"


async def open_chat_client(server, key=None, *, name="client", url=None, **options):
    """A connected ``ChatClient`` of ``server`` (its ``ws_url``, or ``url``).

    ``options`` go to ``ChatClient``; by default it reads in order, does not
    reconnect and explains its failures with the server's log.
    """
    options.setdefault("ordered", True)
    options.setdefault("reconnect", False)
    if hasattr(server, "output"):
        options.setdefault("explain", server_log(server))
    client = ChatClient(url or server.ws_url, token=key, name=name, **options)
    await client.connect()
    assert CONNECTION_ID.fullmatch(client.hello["connection_id"]), client.hello
    return client


def process_of(client):
    """The id of the server process a client's socket is on."""
    return CONNECTION_ID.fullmatch(client.hello["connection_id"]).group(1)
