"""Policies of a server process: idle sockets, shutdown, garbage collection.

- Idle sockets: nothing received for twice the heartbeat closes with 4408.
- Shutdown: SIGTERM closes every open socket with 1001 before the process exits,
  so clients reconnect elsewhere at once.
- Garbage collection: rare and short full collections (``tune_gc``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from django.conf import settings

from chat import protocol, registry
from chat.loops import BackgroundTask

if TYPE_CHECKING:
    from chat.fanout import Hub

# What signal.getsignal() answers: a handler, SIG_DFL/SIG_IGN, or None.
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 1.0


async def connection_refusal(
    *, user_id: int, connection_id: str, device: str | None, live: int
) -> str | None:
    """Why the new socket ``connection_id`` may not stay open (close 1013), or None.

    At most ``CHAT_MAX_CONNECTIONS_PER_USER`` live sockets per user, across
    processes; a socket whose device key replaces a live one takes its place.
    ``live`` is the user's live sockets as ``registry.connection_register``
    answered: counted once the socket is registered, itself included, so that
    sockets opened at the same moment cannot all see room for one more (two at
    the limit may both be refused; never is one let in past it).
    """
    limit = settings.CHAT_MAX_CONNECTIONS_PER_USER
    if not limit or live <= limit:
        return None
    if device is not None and device in await registry.live_devices(
        user_id=user_id, excluding=connection_id
    ):
        return None
    return f"too many connections: at most {limit} per user"


async def _watch_idle_forever(hub: Hub) -> None:
    while True:
        await asyncio.sleep(max(settings.CHAT_HEARTBEAT / 3, 0.1))
        try:
            await close_idle(hub)
        except Exception:
            logger.exception("idle check failed; retrying")


# Close this process's idle sockets, checking every third of a heartbeat.
idle_watch = BackgroundTask(_watch_idle_forever)
start_idle_watch = idle_watch.start
stop_idle_watch = idle_watch.stop


async def close_idle(hub: Hub, now: float | None = None) -> None:
    """Close sockets silent for more than twice the heartbeat with 4408."""
    now = time.monotonic() if now is None else now
    limit = 2 * settings.CHAT_HEARTBEAT
    for connection in list(hub.connections):
        if now - connection.last_seen > limit:
            await connection.close_with(
                protocol.CLOSE_IDLE, f"nothing received for {limit} seconds"
            )


def install_shutdown_handler(hub: Hub) -> bool:
    """On SIGTERM, close every socket with 1001, then let the server stop."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm() -> None:
        loop.create_task(_shutdown(hub, previous))

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError, ValueError):
        # Not the main thread (tests) or no signals here: nothing to install.
        return False
    return True


async def _shutdown(hub: Hub, previous: SignalHandler) -> None:
    connections = list(hub.connections)
    logger.info("SIGTERM: closing %d socket(s) with 1001", len(connections))
    for connection in connections:
        try:
            await connection.close_with(
                protocol.CLOSE_GOING_AWAY, "server shutting down"
            )
        except Exception:
            logger.exception("closing %s failed", connection.connection_id)
    # Give the close frames a moment to leave before the server stops.
    await asyncio.sleep(SHUTDOWN_GRACE_SECONDS if connections else 0)
    if callable(previous):
        previous(signal.SIGTERM, None)
    else:
        raise SystemExit(0)


def tune_gc() -> None:
    """Keep full garbage collections rare and short in a server process.

    Everything loaded at start-up (Django, the URL map, templates) is frozen out
    of the collector's reach, and the thresholds rise, so a collection no longer
    walks the whole heap every few seconds and stalls every socket for 100+ ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
