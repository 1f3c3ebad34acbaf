"""Who is in which room now, across server processes: room presence.

Every joined socket is an entry (room, connection, user). With ``REDIS_URL`` set
the entries live in one Redis sorted set per room, scored with the time their
process last vouched for them, beside a hash of the room's users online (their
username -> how many of their entries are live), so that joining, leaving and
counting cost the same in a room of 5 and of 5,000. The presence keeper (at the
end of this module) refreshes this process's entries and its live-connection
registry entries (``chat.registry``) every third of the heartbeat, sweeps
entries nobody refreshed for a heartbeat (so the users of a process that died go
offline within twice the heartbeat), and when Redis comes back empty puts back
the entries, the registry and the hub's layer groups (``chat.fanout``). Without
Redis the entries live in this process's memory.

``presence`` frames go out (from ``chat.services``) when a user's first socket
enters a room and when their last one leaves; above ``PRESENCE_BATCH_ABOVE``
users online the changes wait for the room's next ``presence_batch``, kept here
until then. Leaving takes two steps: the entry is first marked as leaving
(scored with minus the time it left, which no live range includes), the
``offline`` frame goes out, then the entry is removed. A process killed between
the steps leaves a leaving entry behind, which the other processes' sweep
reports once it is a heartbeat old, so that frame is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from django.conf import settings

from chat import fanout, registry
from chat.loops import BackgroundTask, PerLoop

if TYPE_CHECKING:
    import redis.asyncio as redis
    from django.contrib.auth.models import User
    from redis.typing import EncodableT

    from chat.consumers import ChatConsumer
    from chat.fanout import Hub
    from chat.models import Room

logger = logging.getLogger(__name__)


def _member(connection_id: str, user_id: int, username: str) -> str:
    return f"{connection_id}|{user_id}|{username}"


def _room_members(conn: ChatConsumer) -> list[tuple[int, str]]:
    member = _member(conn.connection_id, conn.user_id, conn.username)
    return [(room_id, member) for room_id in conn.joined_room_ids()]


def _parse(member: bytes | str) -> tuple[str, int, str]:
    """A room entry's (connection_id, user_id, username)."""
    if isinstance(member, bytes):
        member = member.decode()
    connection_id, user_id, username = member.split("|", 2)
    return connection_id, int(user_id), username


class MemoryPresence:
    """Presence for a single process."""

    def __init__(self) -> None:
        self.rooms: dict[int, set[str]] = {}  # room id -> its entries (_member)
        # room id -> username -> how many of their entries are in the room
        self.users: dict[int, dict[str, int]] = {}
        # room id -> username -> status, for the room's next presence_batch
        self.changes: dict[int, dict[str, str]] = {}
        self.batching: set[int] = set()  # rooms whose next batch is due
        self.versions: dict[int, int] = {}  # room id -> its presence version

    def _version_next(self, room_id: int) -> int:
        self.versions[room_id] = self.versions.get(room_id, 0) + 1
        return self.versions[room_id]

    async def socket_count(self, room_id: int) -> int:
        return len(self.rooms.get(room_id, ()))

    async def enter(
        self, room_id: int, connection_id: str, user_id: int, username: str
    ) -> tuple[bool, int]:
        members = self.rooms.setdefault(room_id, set())
        users = self.users.setdefault(room_id, {})
        member = _member(connection_id, user_id, username)
        if member in members:
            return False, len(users)
        members.add(member)
        users[username] = users.get(username, 0) + 1
        first = users[username] == 1
        if first:
            self._version_next(room_id)
        return first, len(users)

    async def join(
        self,
        room_id: int,
        connection_id: str,
        user_id: int,
        username: str,
        *,
        rooms: Iterable[str] | None,
        limit: int,
    ) -> tuple[bool, list[str], int, int]:
        first, _ = await self.enter(room_id, connection_id, user_id, username)
        if rooms is not None:
            await registry.get_registry().set_rooms(connection_id, rooms)
        names, count = await self.online(room_id, limit)
        return first, names, count, self.versions.get(room_id, 0)

    async def exit_begin(
        self, room_id: int, connection_id: str, user_id: int, username: str
    ) -> tuple[bool, int, int]:
        members = self.rooms.get(room_id, set())
        users = self.users.get(room_id, {})
        member = _member(connection_id, user_id, username)
        if member not in members:
            # gone already: its offline frame was sent
            return False, len(users), self.versions.get(room_id, 0)
        members.discard(member)
        users[username] -= 1
        last = users[username] == 0
        if last:
            del users[username]
            self._version_next(room_id)
        if not members:
            self.rooms.pop(room_id, None)
            self.users.pop(room_id, None)
        return last, len(users), self.versions.get(room_id, 0)

    async def exit_end(
        self, room_id: int, connection_id: str, user_id: int, username: str
    ) -> None:
        return None

    async def online(self, room_id: int, limit: int) -> tuple[list[str], int]:
        users = self.users.get(room_id, {})
        return sorted(users)[:limit], len(users)

    async def online_count(self, room_id: int) -> int:
        return len(self.users.get(room_id, ()))

    async def batch_add(self, room_id: int, username: str, status: str) -> bool:
        self.changes.setdefault(room_id, {})[username] = status
        if room_id in self.batching:
            return False
        self.batching.add(room_id)
        return True

    async def batch_take(self, room_id: int) -> tuple[dict[str, str], int]:
        self.batching.discard(room_id)
        return self.changes.pop(room_id, {}), len(self.users.get(room_id, ()))

    async def refresh(self, connections: Iterable[ChatConsumer]) -> None:
        return None

    async def restore(self, connections: Iterable[ChatConsumer]) -> None:
        return None

    async def sweep(self) -> list[tuple[int, str]]:
        return []

    async def close(self) -> None:
        return None


# Each room keeps, beside its entries, a hash of the users online in it (their
# username -> how many of their entries are live): joining and leaving cost the
# same in a room of 5 and of 5,000, and the online count is one HLEN.

# A room's presence version (KEY: its version key) moves on with every user
# who comes online or goes offline: Redis' clock in µs, or one more than the
# last when the clock has not moved on, so it also grows past a Redis that lost
# its data. A socket that joined at version v skips the changes up to v (its
# joined frame had them); see Hub.deliver.
_VERSION_NEXT = """
local now = redis.call('TIME')
local version = math.max(
  tonumber(now[1]) * 1000000 + tonumber(now[2]),
  tonumber(redis.call('GET', KEY) or '0') + 1)
redis.call('SET', KEY, string.format('%.0f', version))
return version
"""


def _with_version(script: str, key: str) -> str:
    """``script`` with ``version_next()`` and ``version()`` for the key ``key``."""
    return f"""
local function version_next()
  local KEY = {key}
{_VERSION_NEXT}
end
local function version()
  return tonumber(redis.call('GET', {key}) or '0')
end
{script}"""


# Add an entry (KEYS: entries, rooms, users, version; ARGV: now, member,
# username, room id); answer {1 when the user just came online, users online
# now, the room's presence version after it}.
_ENTER_BODY = """
local old = redis.call('ZSCORE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
local first = 0
if not old or tonumber(old) < 0 then
  if redis.call('HINCRBY', KEYS[3], ARGV[3], 1) == 1 then first = 1 end
end
local at
if first == 1 then at = version_next() else at = version() end
return {first, redis.call('HLEN', KEYS[3]), at}
"""
_ENTER = _with_version(_ENTER_BODY, "KEYS[4]")

# One live entry fewer for user ARGV[2] in the users hash KEYS[2]; 1 when it
# was their last.
_USER_LESS = """
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# Mark an entry as leaving (KEYS: entries, users, version; ARGV: member,
# username, -now, below every live score); answer {1 when it was live and the
# user's last, users online now, the presence version after it}.
_LEAVE = _with_version(
    """
local function less()
"""
    + _USER_LESS
    + """
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) < 0 then
  return {0, redis.call('HLEN', KEYS[2]), version()}
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
local last = less()
local at
if last == 1 then at = version_next() else at = version() end
return {last, redis.call('HLEN', KEYS[2]), at}
""",
    "KEYS[3]",
)

# Remove an entry nobody vouched for (KEYS: entries, users; ARGV: member,
# username); answer 1 when the user has no live entry left, so that only the
# process whose ZREM wins reports them gone. A leaving entry's count went when
# it was marked; the process that marked it may have died before its offline
# frame, so it is reported again if nothing else keeps the user online.
_EXIT = (
    """
local function less()
"""
    + _USER_LESS
    + """
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(score) >= 0 then return less() end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return 1 end
return 0
"""
)

# Up to ARGV[1] usernames of the users hash KEYS[1], and how many there are.
_ONLINE = """
local n = redis.call('HLEN', KEYS[1])
local limit = tonumber(ARGV[1])
if n <= limit then return {n, redis.call('HKEYS', KEYS[1])} end
local names, cursor = {}, '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', limit)
  cursor = page[1]
  for i = 1, #page[2], 2 do
    if #names < limit then names[#names + 1] = page[2][i] end
  end
until cursor == '0' or #names >= limit
return {n, names}
"""

# A socket joins a room: _ENTER, its registry hash's rooms field, and what
# _ONLINE answers, in one round trip (KEYS: _ENTER's, the socket's hash; ARGV:
# _ENTER's, the rooms field, the names' limit, 1 to write the rooms field):
# {1 when the user just came online, users online, the presence version, {up
# to limit names}}.
_JOIN = _with_version(
    """
local function enter()
"""
    + _ENTER_BODY
    + """
end
local function online()
  local KEYS = {KEYS[3]}
  local ARGV = {ARGV[6]}
"""
    + _ONLINE
    + """
end
local entered = enter()
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('HSET', KEYS[5], 'rooms', ARGV[5])
end
local listed = online()
return {entered[1], listed[1], entered[3], listed[2]}
""",
    "KEYS[4]",
)

# A presence change of a big room, kept for its next presence_batch (KEYS:
# changes, batching; ARGV: username, status, ms the batching mark lasts at
# most); 1 when no batch was due yet: the caller sends the next one.
_BATCH_ADD = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""

# The changes since the last batch, taken (KEYS: changes, batching, users):
# {users online now, username, status, username, status, ...}.
_BATCH_TAKE = """
local changes = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
local answer = {redis.call('HLEN', KEYS[3])}
for i = 1, #changes do answer[i + 1] = changes[i] end
return answer
"""

# A batching mark outlives a process that died before it sent the batch: the
# next change after this many ms sends it.
BATCHING_MARK_MS = 3000


class RedisPresence:
    """Presence shared by every process through Redis.

    The client answers bytes (no ``decode_responses``), and ``zrangebyscore``
    without scores a list of members: redis-py's types cannot tell, hence the
    casts to ``list[bytes]``.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        stale_after: float,
        *,
        client: redis.Redis | None = None,
    ) -> None:
        """``client``: a Redis client to share (the registry's); else its own."""
        self._owns_client = client is None
        self.redis = registry.redis_client(url) if client is None else client
        self.prefix = prefix
        self.stale_after = stale_after
        self._enter = self.redis.register_script(_ENTER)
        self._join = self.redis.register_script(_JOIN)
        self._leave = self.redis.register_script(_LEAVE)
        self._exit = self.redis.register_script(_EXIT)
        self._online = self.redis.register_script(_ONLINE)
        self._batch_add = self.redis.register_script(_BATCH_ADD)
        self._batch_take = self.redis.register_script(_BATCH_TAKE)

    def _key(self, room_id: int) -> str:
        return f"{self.prefix}:presence:{room_id}"

    def _users_key(self, room_id: int) -> str:
        return f"{self.prefix}:presence:{room_id}:users"

    def _version_key(self, room_id: int) -> str:
        return f"{self.prefix}:presence:{room_id}:version"

    def _entry_keys(self, room_id: int) -> list[str]:
        """_ENTER's keys: entries, rooms, users, version."""
        return [
            self._key(room_id),
            self._rooms_key,
            self._users_key(room_id),
            self._version_key(room_id),
        ]

    def _changes_key(self, room_id: int) -> str:
        return f"{self.prefix}:presence:{room_id}:changes"

    def _batching_key(self, room_id: int) -> str:
        return f"{self.prefix}:presence:{room_id}:batching"

    @property
    def _rooms_key(self) -> str:
        return f"{self.prefix}:presence:rooms"

    def _live_since(self) -> float:
        return time.time() - self.stale_after

    async def socket_count(self, room_id: int) -> int:
        """The live entries (sockets) of a room."""
        return await self.redis.zcount(self._key(room_id), self._live_since(), "+inf")

    async def enter(
        self, room_id: int, connection_id: str, user_id: int, username: str
    ) -> tuple[bool, int]:
        member = _member(connection_id, user_id, username)
        first, count, _ = await self._enter(
            keys=self._entry_keys(room_id),
            args=[time.time(), member, username, room_id],
        )
        return bool(first), int(count)

    async def join(
        self,
        room_id: int,
        connection_id: str,
        user_id: int,
        username: str,
        *,
        rooms: Iterable[str] | None,
        limit: int,
    ) -> tuple[bool, list[str], int, int]:
        """``enter``, the socket's rooms (unless None), ``online``: one round trip.

        Answers (first, names, count, the room's presence version after it).
        """
        member = _member(connection_id, user_id, username)
        keys = self._entry_keys(room_id)
        keys.append(registry.connection_key(self.prefix, connection_id))
        rooms_field = "" if rooms is None else ",".join(rooms)
        args: list[EncodableT] = [time.time(), member, username, room_id]
        args += [rooms_field, limit, int(rooms is not None)]
        first, count, version, names = await self._join(keys=keys, args=args)
        names = sorted(name.decode() for name in names)
        return bool(first), names, int(count), int(version)

    async def exit_begin(
        self, room_id: int, connection_id: str, user_id: int, username: str
    ) -> tuple[bool, int, int]:
        """Mark the entry as leaving: (the user's last live one, users online
        now, the room's presence version after it)."""
        member = _member(connection_id, user_id, username)
        keys = [self._key(room_id), self._users_key(room_id)]
        keys.append(self._version_key(room_id))
        last, count, version = await self._leave(
            keys=keys, args=[member, username, -time.time()]
        )
        return bool(last), int(count), int(version)

    async def exit_end(
        self, room_id: int, connection_id: str, user_id: int, username: str
    ) -> None:
        """Remove the entry, once its ``offline`` frame (if any) went out."""
        await self.redis.zrem(
            self._key(room_id), _member(connection_id, user_id, username)
        )

    async def online(self, room_id: int, limit: int) -> tuple[list[str], int]:
        count, names = await self._online(keys=[self._users_key(room_id)], args=[limit])
        return sorted(name.decode() for name in names), int(count)

    async def online_count(self, room_id: int) -> int:
        return int(await self.redis.hlen(self._users_key(room_id)))

    async def batch_add(self, room_id: int, username: str, status: str) -> bool:
        keys = [self._changes_key(room_id), self._batching_key(room_id)]
        args: list[str | int] = [username, status, BATCHING_MARK_MS]
        return bool(await self._batch_add(keys=keys, args=args))

    async def batch_take(self, room_id: int) -> tuple[dict[str, str], int]:
        keys = [
            self._changes_key(room_id),
            self._batching_key(room_id),
            self._users_key(room_id),
        ]
        count, *flat = await self._batch_take(keys=keys)
        changes = {
            flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)
        }
        return changes, int(count)

    async def refresh(self, connections: Iterable[ChatConsumer]) -> None:
        """Vouch for the room entries of this process's sockets."""
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for conn in connections:
                for room_id, member in _room_members(conn):
                    # Only existing entries (XX): one that left stays gone.
                    pipe.zadd(self._key(room_id), {member: now}, xx=True)
            await pipe.execute()

    async def restore(self, connections: Iterable[ChatConsumer]) -> None:
        """Put back the room entries of this process's sockets (Redis lost them)."""
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for conn in connections:
                for room_id, member in _room_members(conn):
                    # Through the script, so that the users hash counts it.
                    keys = self._entry_keys(room_id)
                    args: list[str | int | float] = [
                        now,
                        member,
                        _parse(member)[2],
                        room_id,
                    ]
                    await self._enter(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def sweep(self) -> list[tuple[int, str]]:
        """Drop entries nobody vouched for; return (room_id, username) gone offline."""
        gone: list[tuple[int, str]] = []
        cutoff = self._live_since()
        for raw_room in await self.redis.smembers(self._rooms_key):
            room_id = int(raw_room)
            key = self._key(room_id)
            # Live entries nobody refreshed for a heartbeat, and entries left
            # leaving for a heartbeat (scored -left_at, so above -cutoff).
            stale = cast(
                list[bytes],
                await self.redis.zrangebyscore(key, f"({-cutoff}", f"({cutoff}"),
            )
            for member in stale:
                _, _, username = _parse(member)
                keys = [key, self._users_key(room_id)]
                last = await self._exit(keys=keys, args=[member, username])
                if last:
                    gone.append((room_id, username))
            if not await self.redis.exists(key):
                await self.redis.srem(self._rooms_key, room_id)
                await self.redis.delete(self._users_key(room_id))
        return gone

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()


def _store_new() -> RedisPresence | MemoryPresence:
    if settings.REDIS_URL:
        # The registry's client: one connection pool per process for both.
        live = registry.get_registry()
        return RedisPresence(
            settings.REDIS_URL,
            settings.CHAT_REDIS_PREFIX,
            settings.CHAT_HEARTBEAT,
            client=live.redis if isinstance(live, registry.RedisRegistry) else None,
        )
    return MemoryPresence()


_stores: PerLoop[RedisPresence | MemoryPresence] = PerLoop(_store_new)


def get_store() -> RedisPresence | MemoryPresence:
    """The presence store for the running loop (Redis when ``REDIS_URL`` is set)."""
    return _stores.get()


async def reset_store() -> None:
    store = _stores.pop()
    if store is not None:
        await store.close()


# joined lists at most this many of the users online (the contract's bound).
ONLINE_LISTED = 100


async def room_enter(
    *,
    room: Room,
    connection_id: str,
    user: User,
    rooms: Iterable[str] | None = None,
) -> tuple[bool, list[str], int, int]:
    """Record a socket in ``room``.

    ``rooms``: the slugs of every room the socket has joined now, for the
    live-connection registry. Answer whether the user just came online, up to
    ``ONLINE_LISTED`` names online (sorted), how many are, and the room's
    presence version (the changes up to it are in those names): one round trip
    with Redis.
    """
    return await get_store().join(
        room.pk,
        connection_id,
        user.pk,
        user.get_username(),
        rooms=None if rooms is None else list(rooms),
        limit=ONLINE_LISTED,
    )


async def room_exit_begin(
    *, room: Room, connection_id: str, user: User
) -> tuple[bool, int, int]:
    """Mark a socket as leaving ``room``: (it was the user's last, users online,
    the room's presence version after it)."""
    username = user.get_username()
    return await get_store().exit_begin(room.pk, connection_id, user.pk, username)


async def room_exit_end(*, room: Room, connection_id: str, user: User) -> None:
    """Forget a leaving socket, once its ``offline`` frame (if any) went out."""
    username = user.get_username()
    await get_store().exit_end(room.pk, connection_id, user.pk, username)


async def room_online(room: Room) -> tuple[list[str], int]:
    """Up to ``ONLINE_LISTED`` usernames online in ``room``, sorted, and how many."""
    return await get_store().online(room.pk, ONLINE_LISTED)


async def room_online_count(room: Room) -> int:
    return await get_store().online_count(room.pk)


async def room_socket_count(room: Room) -> int:
    """How many live sockets, on every process, joined ``room``."""
    return await get_store().socket_count(room.pk)


async def room_batch_add(*, room: Room, username: str, status: str) -> bool:
    """Keep a change for the room's next batch; True: the caller sends that one."""
    return await get_store().batch_add(room.pk, username, status)


async def room_batch_take(*, room: Room) -> tuple[dict[str, str], int]:
    """The room's changes since its last batch (username -> status), and its count."""
    return await get_store().batch_take(room.pk)


# While Redis is out of reach the keeper tries this often, so that fan-out
# groups and presence are back within about a second of its return.
OUTAGE_RETRY_SECONDS = 1.0


async def _keep_forever(hub: Hub) -> None:
    interval = max(settings.CHAT_HEARTBEAT / 3, 0.2)
    failing_since: float | None = None
    while True:
        await asyncio.sleep(
            interval if failing_since is None else min(interval, OUTAGE_RETRY_SECONDS)
        )
        try:
            await keep_once(hub)
        except asyncio.CancelledError:
            raise
        except Exception:
            if failing_since is None:
                failing_since = time.monotonic()
                logger.exception("presence keeper failed; retrying every second")
            continue
        if failing_since is not None:
            logger.warning(
                "presence keeper reached Redis again after %.1f s",
                time.monotonic() - failing_since,
            )
            failing_since = None


# This process's presence keeper, once per event loop.
keeper = BackgroundTask(_keep_forever)
start_keeper = keeper.start
stop_keeper = keeper.stop


async def keep_once(hub: Hub) -> None:
    """Vouch for this process's sockets and report the users of dead processes.

    When Redis lost its data the registry, the room entries and the hub's
    layer groups are put back first.
    """
    from chat import services

    connections = list(hub.connections)
    live = registry.get_registry()
    store = get_store()
    lost = await live.refresh(connections)
    await store.refresh(connections)
    if lost:
        await live.restore(connections)
        await store.restore(connections)
        await fanout.groups_restore(hub)
        live.restored()
        logger.warning("Redis had lost its data; presence and fan-out groups restored")
    else:
        await fanout.groups_upkeep(hub)
    await live.sweep()
    await services.room_presence_sweep_report(gone=await store.sweep())
