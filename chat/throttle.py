"""Rate limits on the frames a client sends.

- Frames that read or write the database (``join``, ``leave``, ``send``,
  ``history``, ``edit``, ``delete``, ``read``, ``dm``) count against
  ``CHAT_RATE_LIMIT`` ("N/S": N frames per S seconds, a moving window), per user
  across all their sockets and server processes. The count lives in Redis when
  ``REDIS_URL`` is set (the ``limits`` library's storage), else in the process.
  ``"0"`` turns it off: no round trip at all.
- A process takes a user's slots in leases (``lease_size``: a tenth of N, 1 to
  20): one count in the store reserves them, and the frames that use them are
  let through without asking again, so most frames wait for no round trip
  (one before each frame cost a busy server's rooms twice their p99). A lease
  lasts half the window. The price: a user may be refused up to a lease minus
  one frame early (a lease that no longer fits is refused whole), and slots a
  process reserved and did not use count until they leave the window.
- ``ping`` and ``typing`` cost the server nothing stored: they get a cheap cap
  of their own per socket, counted in the process (``CHEAP_RATE``).

A refused frame is answered ``rate_limited`` with ``retry_after``; until then
the socket's further frames are refused without asking Redis. A socket refused
``STRIKES_BEFORE_CLOSE`` times in a row is closed with 1008. A Redis outage
lets frames through (logged once a minute): chat goes on unmetered rather than
stopping.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import MemoryStorage as SyncMemoryStorage
from limits.storage import RedisStorage as SyncRedisStorage
from limits.storage import Storage as SyncStorage
from limits.strategies import MovingWindowRateLimiter as SyncMovingWindowRateLimiter

from chat import protocol
from chat.loops import PerLoop
from chat.protocol import ChatError

logger = logging.getLogger(__name__)

DATABASE_FRAMES = frozenset(
    {"join", "leave", "send", "history", "edit", "delete", "read", "dm"}
)
CHEAP_FRAMES = frozenset({"ping", "typing"})
STRIKES_BEFORE_CLOSE = 10
# Seconds Redis may take to answer a count before the frame goes through.
REDIS_TIMEOUT = 2.0
OUTAGE_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class Rate:
    count: int
    seconds: int

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds}"


# ping and typing, per socket: far above a client's heartbeat pings and a
# typist's typing notices (the web client sends one every 3 s at most).
CHEAP_RATE = Rate(30, 10)


def parse_rate(text: str, setting: str = "CHAT_RATE_LIMIT") -> Rate | None:
    """The ``Rate`` of a setting such as ``"20/10"``; None for ``"0"`` (off)."""
    text = text.strip()
    if text in {"", "0"}:
        return None
    count, slash, seconds = text.partition("/")
    try:
        rate = Rate(int(count), int(seconds) if slash else 1)
    except ValueError:
        rate = None
    if rate is None or rate.count < 1 or rate.seconds < 1:
        raise ImproperlyConfigured(
            f'{setting} must be "N/S" (N per S seconds) or "0", not {text!r}'
        )
    return rate


def _storage_new() -> Storage:
    if settings.REDIS_URL:
        return RedisStorage(
            f"async+{settings.REDIS_URL}",
            implementation="redispy",
            key_prefix=f"{settings.CHAT_REDIS_PREFIX}:limits",
            wrap_exceptions=True,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
        )
    return MemoryStorage()


_limiters: PerLoop[MovingWindowRateLimiter] = PerLoop(
    lambda: MovingWindowRateLimiter(_storage_new())
)

LEASE_MAX = 20


def lease_size(rate: Rate) -> int:
    """How many of a user's slots one count reserves: N/10, from 1 up to 20."""
    return max(1, min(LEASE_MAX, rate.count // 10))


class Lease:
    """Slots of one user's window this process reserved and has not used yet."""

    __slots__ = ("left", "until")

    def __init__(self, left: int, until: float) -> None:
        self.left = left
        self.until = until  # time.monotonic() after which they are not used


# user id -> their lease in this process (the running loop's)
_leases: PerLoop[dict[int, Lease]] = PerLoop(dict)
_last_outage_log = -math.inf


async def reset() -> None:
    """Forget the counts and close the running loop's Redis client (tests)."""
    global _signup_limiter
    _signup_limiter = None
    _leases.pop()
    limiter = _limiters.pop()
    if limiter is not None and isinstance(limiter.storage, RedisStorage):
        # The redis-py bridge's client (the bridge's base class declares none).
        client: Any = limiter.storage.bridge.get_connection()  # type: ignore[attr-defined]
        await client.aclose()


def rate_limited(retry_after: float) -> ChatError:
    return ChatError(
        protocol.RATE_LIMITED,
        f"too many frames: try again in {retry_after:g} s",
        retry_after=retry_after,
    )


async def user_refusal(*, user_id: int, rate: Rate) -> float | None:
    """Seconds until ``user_id`` may send a database frame again, or None: go.

    From this process's lease when it has slots left, else one count in the
    store that reserves a new lease. Refused, it answers the whole window: the
    time by which every counted frame has surely left it (asking the store when
    the oldest leaves would cost a second round trip).
    """
    now = time.monotonic()
    leases = _leases.get()
    lease = leases.get(user_id)
    if lease is not None and lease.left > 0 and now < lease.until:
        lease.left -= 1
        return None
    size = lease_size(rate)
    item = RateLimitItemPerSecond(rate.count, rate.seconds)
    try:
        granted = await _limiters.get().hit(item, "frames", str(user_id), cost=size)
    except StorageError as exc:
        _log_outage(exc)
        return None
    if not granted:
        return float(rate.seconds)
    if size > 1:
        if len(leases) > 1000:  # forget the spent ones now and then
            for spent in [u for u, le in leases.items() if now >= le.until]:
                del leases[spent]
        leases[user_id] = Lease(size - 1, now + rate.seconds / 2)
    return None


def _log_outage(exc: Exception) -> None:
    global _last_outage_log
    if time.monotonic() - _last_outage_log >= OUTAGE_LOG_INTERVAL:
        _last_outage_log = time.monotonic()
        logger.warning("rate limit storage unavailable, frames go unmetered: %s", exc)


class SocketWindow:
    """A fixed-window count of one socket's cheap frames, kept in the process."""

    __slots__ = ("rate", "started", "count")

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self.started = -math.inf
        self.count = 0

    def refusal(self, now: float) -> float | None:
        if now - self.started >= self.rate.seconds:
            self.started, self.count = now, 0
        if self.count < self.rate.count:
            self.count += 1
            return None
        return max(round(self.started + self.rate.seconds - now, 1), 0.1)


class SocketThrottle:
    """The rate limits one socket's frames meet; ``check`` is called per frame."""

    __slots__ = ("user_id", "rate", "cheap", "blocked_until", "strikes")

    def __init__(self, *, user_id: int) -> None:
        self.user_id = user_id
        self.rate = parse_rate(settings.CHAT_RATE_LIMIT)
        self.cheap = SocketWindow(CHEAP_RATE)
        # time.monotonic() before which database frames are refused locally.
        self.blocked_until = -math.inf
        self.strikes = 0  # refusals in a row

    @property
    def exhausted(self) -> bool:
        """Whether the client kept sending through enough refusals to be closed."""
        return self.strikes >= STRIKES_BEFORE_CLOSE

    async def check(self, frame_type: str) -> None:
        """Raise ``rate_limited`` if a frame of ``frame_type`` is over a limit."""
        now = time.monotonic()
        retry_after: float | None = None
        if frame_type in CHEAP_FRAMES:
            retry_after = self.cheap.refusal(now)
        elif self.rate is not None and frame_type in DATABASE_FRAMES:
            if now < self.blocked_until:
                retry_after = max(round(self.blocked_until - now, 1), 0.1)
            else:
                retry_after = await user_refusal(user_id=self.user_id, rate=self.rate)
                if retry_after is not None:
                    self.blocked_until = now + retry_after
        if retry_after is None:
            self.strikes = 0
            return
        self.strikes += 1
        raise rate_limited(retry_after)


# --- sign-ups, counted by address (the HTTP views are synchronous) -------------

_signup_limiter: SyncMovingWindowRateLimiter | None = None


def _sync_storage_new() -> SyncStorage:
    if settings.REDIS_URL:
        return SyncRedisStorage(
            settings.REDIS_URL,
            key_prefix=f"{settings.CHAT_REDIS_PREFIX}:limits",
            wrap_exceptions=True,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
        )
    return SyncMemoryStorage()


def signup_refusal(*, address: str | None) -> int | None:
    """Seconds until ``address`` may create another account, or None: go.

    ``CHAT_SIGNUP_RATE`` accounts per address (a moving window, shared by every
    process through Redis). Like the frame limit, an outage of its storage lets
    sign-ups through.
    """
    global _signup_limiter
    rate = parse_rate(settings.CHAT_SIGNUP_RATE, "CHAT_SIGNUP_RATE")
    if rate is None or address is None:
        return None
    if _signup_limiter is None:
        _signup_limiter = SyncMovingWindowRateLimiter(_sync_storage_new())
    item = RateLimitItemPerSecond(rate.count, rate.seconds)
    try:
        if _signup_limiter.hit(item, "signups", address):
            return None
    except StorageError as exc:
        _log_outage(exc)
        return None
    return rate.seconds
