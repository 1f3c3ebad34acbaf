"""Every live socket on every server process: the live-connection registry.

A socket is registered once its handshake is accepted (id, user, process,
device, the rooms it joined) and forgotten when it closes. With ``REDIS_URL``
set the entries live in Redis, scored with the time their process last vouched
for them: the presence keeper (``chat.presence``) refreshes this process's
entries every third of the heartbeat, and entries nobody refreshed for a
heartbeat are swept, so the sockets of a process that died drop out within
twice the heartbeat. Redis coming back empty (a restart, a flush) is noticed
here (``refresh`` answers True) and the entries are put back. Without Redis the
entries live in this process's memory.

The per-user socket cap, device replacement, pushes and the admin's list of
live connections read it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypedDict, cast

from django.conf import settings

from chat.loops import PerLoop

if TYPE_CHECKING:
    import redis.asyncio as redis
    from redis.asyncio.client import Pipeline
    from redis.typing import EncodableT

    from chat.consumers import ChatConsumer


class ConnectionInfo(TypedDict):
    """What the registry keeps of a socket (``ChatConsumer.info``)."""

    id: str
    user_id: int
    username: str
    process: str
    connected_at: str
    device: str | None
    rooms: list[str]  # the slugs of the rooms it joined


def _encode_info(info: ConnectionInfo) -> dict[EncodableT, EncodableT]:
    """The Redis hash of ``info``: None as "", the rooms comma-separated."""
    fields: Mapping[str, Any] = info  # every field as it is, whatever its type
    encoded: dict[EncodableT, EncodableT] = {
        key: "" if value is None else value for key, value in fields.items()
    }
    encoded["rooms"] = ",".join(info.get("rooms", ()))
    return encoded


def _decode_info(row: dict[bytes, bytes]) -> ConnectionInfo:
    info: dict[str, Any] = {key.decode(): value.decode() for key, value in row.items()}
    info["user_id"] = int(info["user_id"])
    info["rooms"] = [slug for slug in info.get("rooms", "").split(",") if slug]
    info["device"] = info.get("device") or None
    return cast(ConnectionInfo, info)


def connection_key(prefix: str, connection_id: str) -> str:
    """The Redis hash of a socket (``chat.presence`` writes its rooms field too)."""
    return f"{prefix}:conn:{connection_id}"


class MemoryRegistry:
    """The registry of a single process."""

    def __init__(self) -> None:
        self.connections: dict[str, ConnectionInfo] = {}

    async def add(self, info: ConnectionInfo) -> int:
        self.connections[info["id"]] = info.copy()
        return await self.count(user_id=info["user_id"])

    async def set_rooms(self, connection_id: str, rooms: Iterable[str]) -> None:
        if connection_id in self.connections:
            self.connections[connection_id]["rooms"] = list(rooms)

    async def remove(self, connection_id: str, user_id: int) -> None:
        self.connections.pop(connection_id, None)

    async def all(self) -> list[ConnectionInfo]:
        return sorted(self.connections.values(), key=lambda c: c["connected_at"])

    async def count(
        self, *, user_id: int | None = None, connection_id: str | None = None
    ) -> int:
        if connection_id is not None:
            return int(connection_id in self.connections)
        if user_id is not None:
            return sum(c["user_id"] == user_id for c in self.connections.values())
        return len(self.connections)

    async def devices(self, user_id: int, excluding: str | None = None) -> set[str]:
        return {
            c["device"]
            for c in self.connections.values()
            if c["user_id"] == user_id and c["device"] and c["id"] != excluding
        }

    async def refresh(self, connections: Iterable[ChatConsumer]) -> bool:
        return False

    async def restore(self, connections: Iterable[ChatConsumer]) -> None:
        return None

    def restored(self) -> None:
        return None

    async def sweep(self) -> None:
        return None

    async def close(self) -> None:
        return None


def redis_client(url: str) -> redis.Redis:
    """A client for the registry and presence (``chat.presence`` shares it)."""
    import redis.asyncio as redis

    # After a Redis restart every pooled connection is dead; retry a command
    # once on a fresh connection instead of failing it.
    # A blocking pool: under a connect storm commands wait for a connection
    # instead of failing (redis-py's plain pool raises past its cap).
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=32, timeout=20, retry_on_error=[redis.ConnectionError]
    )
    return redis.Redis(connection_pool=pool)


class RedisRegistry:
    """The registry shared by every process through Redis.

    The client answers bytes (no ``decode_responses``), and ``zrangebyscore``
    without scores a list of members: redis-py's types cannot tell, hence the
    casts to ``list[bytes]``.
    """

    def __init__(self, url: str, prefix: str, stale_after: float) -> None:
        self.redis = redis_client(url)
        self.prefix = prefix
        self.stale_after = stale_after
        self._epoch: bytes | None = None
        self._restoring = False

    @property
    def _conns_key(self) -> str:
        return f"{self.prefix}:conns"

    def _conn_key(self, connection_id: str) -> str:
        return connection_key(self.prefix, connection_id)

    def _user_conns_key(self, user_id: int) -> str:
        return f"{self.prefix}:userconns:{user_id}"

    @property
    def _epoch_key(self) -> str:
        # Set once by whichever process finds it missing: a new value means
        # Redis lost its data since this process last looked.
        return f"{self.prefix}:presence:epoch"

    def _epoch_queue(self, pipe: Pipeline) -> None:
        pipe.set(self._epoch_key, secrets.token_hex(8), nx=True)
        pipe.get(self._epoch_key)

    def _live_since(self) -> float:
        return time.time() - self.stale_after

    def _queue_connection(
        self, pipe: Pipeline, info: ConnectionInfo, now: float
    ) -> None:
        pipe.hset(self._conn_key(info["id"]), mapping=_encode_info(info))
        pipe.zadd(self._conns_key, {info["id"]: now})
        pipe.zadd(self._user_conns_key(info["user_id"]), {info["id"]: now})

    async def add(self, info: ConnectionInfo) -> int:
        """Register the socket; answer its user's live sockets, itself counted."""
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            self._queue_connection(pipe, info, now)
            user_key = self._user_conns_key(info["user_id"])
            pipe.zcount(user_key, now - self.stale_after, "+inf")
            if self._epoch is None:
                self._epoch_queue(pipe)
            answers = await pipe.execute()
        if self._epoch is None:
            # Known from the first socket on: a Redis that loses its data
            # before the keeper's first tick is noticed too.
            self._epoch = answers[-1]
        return int(answers[3])

    async def set_rooms(self, connection_id: str, rooms: Iterable[str]) -> None:
        await self.redis.hset(self._conn_key(connection_id), "rooms", ",".join(rooms))

    async def remove(self, connection_id: str, user_id: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._conn_key(connection_id))
            pipe.zrem(self._conns_key, connection_id)
            pipe.zrem(self._user_conns_key(user_id), connection_id)
            await pipe.execute()

    async def all(self) -> list[ConnectionInfo]:
        since = self._live_since()
        ids = cast(
            list[bytes], await self.redis.zrangebyscore(self._conns_key, since, "+inf")
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for connection_id in ids:
                pipe.hgetall(self._conn_key(connection_id.decode()))
            rows = await pipe.execute()
        infos = [_decode_info(row) for row in rows if row]
        return sorted(infos, key=lambda c: c["connected_at"])

    async def count(
        self, *, user_id: int | None = None, connection_id: str | None = None
    ) -> int:
        since = self._live_since()
        if connection_id is not None:
            score = await self.redis.zscore(self._conns_key, connection_id)
            return int(score is not None and score >= since)
        key = self._conns_key if user_id is None else self._user_conns_key(user_id)
        return await self.redis.zcount(key, since, "+inf")

    async def devices(self, user_id: int, excluding: str | None = None) -> set[str]:
        key = self._user_conns_key(user_id)
        ids = cast(
            list[bytes], await self.redis.zrangebyscore(key, self._live_since(), "+inf")
        )
        if excluding is not None:
            ids = [i for i in ids if i != excluding.encode()]
        async with self.redis.pipeline(transaction=False) as pipe:
            for connection_id in ids:
                pipe.hget(self._conn_key(connection_id.decode()), "device")
            devices = await pipe.execute()
        return {device.decode() for device in devices if device}

    async def refresh(self, connections: Iterable[ChatConsumer]) -> bool:
        """Vouch for this process's sockets.

        Return True when Redis had lost its data: the caller puts back what it
        keeps there (``restore`` here, and the rest), then calls ``restored``;
        until then every refresh answers True again.
        """
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            self._epoch_queue(pipe)
            for conn in connections:
                # Only existing entries (XX): one that left meanwhile stays gone.
                pipe.zadd(self._conns_key, {conn.connection_id: now}, xx=True)
                user_key = self._user_conns_key(conn.user_id)
                pipe.zadd(user_key, {conn.connection_id: now}, xx=True)
            _, epoch, *_ = await pipe.execute()
        if self._epoch is not None and epoch != self._epoch:
            self._restoring = True
        self._epoch = epoch
        return self._restoring

    async def restore(self, connections: Iterable[ChatConsumer]) -> None:
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for conn in connections:
                self._queue_connection(pipe, conn.info(), now)
            await pipe.execute()

    def restored(self) -> None:
        self._restoring = False

    async def sweep(self) -> None:
        """Forget the sockets nobody vouched for within a heartbeat."""
        stale = cast(
            list[bytes],
            await self.redis.zrangebyscore(
                self._conns_key, "-inf", f"({self._live_since()}"
            ),
        )
        for raw in stale:
            connection_id = raw.decode()
            user_id = await self.redis.hget(self._conn_key(connection_id), "user_id")
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._conn_key(connection_id))
                pipe.zrem(self._conns_key, connection_id)
                if user_id is not None:
                    pipe.zrem(self._user_conns_key(int(user_id)), connection_id)
                await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()


def _registry_new() -> RedisRegistry | MemoryRegistry:
    if settings.REDIS_URL:
        return RedisRegistry(
            settings.REDIS_URL, settings.CHAT_REDIS_PREFIX, settings.CHAT_HEARTBEAT
        )
    return MemoryRegistry()


_registries: PerLoop[RedisRegistry | MemoryRegistry] = PerLoop(_registry_new)


def get_registry() -> RedisRegistry | MemoryRegistry:
    """The registry for the running loop (Redis when ``REDIS_URL`` is set)."""
    return _registries.get()


async def reset_registry() -> None:
    registry = _registries.pop()
    if registry is not None:
        await registry.close()


async def connection_register(info: ConnectionInfo) -> int:
    """Record a live socket: id, user_id, username, process, connected_at, device.

    Answer how many live sockets its user has now, this one counted.
    """
    return await get_registry().add({**info, "rooms": []})


async def connection_rooms_changed(connection: ChatConsumer) -> None:
    await get_registry().set_rooms(connection.connection_id, list(connection.rooms))


async def connection_unregister(connection: ChatConsumer) -> None:
    await get_registry().remove(connection.connection_id, connection.user_id)


async def live_connections() -> list[ConnectionInfo]:
    """Every live socket on every process, oldest first (dicts, see register)."""
    return await get_registry().all()


async def live_count(
    *, user_id: int | None = None, connection_id: str | None = None
) -> int:
    """How many live sockets: of a user, with an id, or all."""
    return await get_registry().count(user_id=user_id, connection_id=connection_id)


async def live_devices(*, user_id: int, excluding: str | None = None) -> set[str]:
    """The device keys of a user's live sockets, on every process.

    ``excluding``: a connection id whose device key is left out.
    """
    return await get_registry().devices(user_id, excluding)
