"""What a client of chatsite does on its side of the wire.

The room page (``chat/static/chat/chat.js``), the tests' socket clients and the
benchmark's load generator reconnect by the same rule, so that a process that
goes away does not bring all of its sockets back in one instant.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable

from chat.protocol import CLOSE_GOING_AWAY

# Full-jitter exponential backoff: retry n (from 0) waits a random time in
# [0, min(BACKOFF_MAX, BACKOFF_FIRST * 2**n)).
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
# After a 1001 (a process going away, as in a deploy) another process is up
# already: the first retry only spreads the sockets over this window.
FIRST_AFTER_GOING_AWAY_SECONDS = 2.0


def reconnect_delay(
    attempt: int,
    close_code: int | None = None,
    random: Callable[[], float] = _random.random,
) -> float:
    """Seconds to wait before reconnect ``attempt`` (0 for the first retry).

    ``random`` answers in [0, 1); a test passes its own to get exact delays.
    """
    if attempt == 0 and close_code == CLOSE_GOING_AWAY:
        return random() * FIRST_AFTER_GOING_AWAY_SECONDS
    # Capped before the power: a client retrying for days must not overflow.
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** min(attempt, 32))
    return random() * ceiling
