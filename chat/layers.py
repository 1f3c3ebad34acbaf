"""channels-redis' layer with fewer Redis round trips per call.

Every join and every broadcast goes through ``group_add`` and ``group_send``,
and every event a process gets through ``receive``. channels-redis 4.3 spends
two round trips on a ``group_add`` (ZADD, then EXPIRE), four on a
``group_send`` (expire the group, read it, expire the channels' old messages,
then an EVAL that sends the script's text each time) and four on a receive
(put back the in-flight backup, BZPOPMIN, ZADD to the backup, then pop the
backup once handled). This layer does the same work, on the same keys, in one
round trip for ``group_add``, two for ``group_send`` (a pipeline reading the
group, then one cached script per shard that expires and adds) and two for a
receive when a message waits (one script puts the backup back, pops and backs
up; the blocking pop only when nothing waits). Messages, keys and capacities
are channels-redis' own, so processes with either layer interoperate.

It is written against channels-redis 4.3.0's internals (the lock pins it); on
another version it behaves exactly as channels-redis does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import channels_redis
from channels_redis.core import RedisChannelLayer as _ChannelsRedisLayer

logger = logging.getLogger(__name__)

WRITTEN_FOR = "4.3.0"

# KEYS: the channels' keys; ARGV: a message per key, a capacity per key, now,
# the message expiry, and the score below which old messages go. Answers how
# many channels were over capacity (their message is dropped, as upstream).
_GROUP_SEND = """
local n = #KEYS
local now = ARGV[2 * n + 1]
local expiry = ARGV[2 * n + 2]
local stale = ARGV[2 * n + 3]
local over_capacity = 0
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, stale)
  if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[n + i]) then
    redis.call('ZADD', KEYS[i], now, ARGV[i])
    redis.call('EXPIRE', KEYS[i], expiry)
  else
    over_capacity = over_capacity + 1
  end
end
return over_capacity
"""


# KEYS: a channel's key, its in-flight backup. Put back what the backup holds
# (a receive that died before its message was handled), pop the oldest message
# and back it up, as channels-redis does around its BZPOPMIN; false when none.
_RECEIVE = """
local backed_up = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = #backed_up, 1, -2 do
  redis.call('ZADD', KEYS[1], backed_up[i], backed_up[i - 1])
end
redis.call('DEL', KEYS[2])
local popped = redis.call('ZPOPMIN', KEYS[1])
if #popped == 0 then return false end
redis.call('ZADD', KEYS[2], popped[2], popped[1])
return popped[1]
"""


# KEYS: a channel's key, its in-flight backup; ARGV: how many to pop, and 1 when
# the backup holds what the last receive_many handed over (dropped now) or 0
# when it may hold what a cancelled one did not (put back first). Pops up to
# that many of the oldest messages, backs them up and answers them, oldest
# first (an empty list when none waits).
_RECEIVE_MANY = """
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[2])
else
  local backed_up = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = #backed_up, 1, -2 do
    redis.call('ZADD', KEYS[1], backed_up[i], backed_up[i - 1])
  end
  redis.call('DEL', KEYS[2])
end
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
local members = {}
for i = 1, #popped, 2 do
  redis.call('ZADD', KEYS[2], popped[i + 1], popped[i])
  members[#members + 1] = popped[i]
end
return members
"""


class RedisChannelLayer(_ChannelsRedisLayer):
    """``channels_redis.core.RedisChannelLayer``, group calls batched."""

    batched = channels_redis.__version__ == WRITTEN_FOR

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group_send_scripts: dict[int, Any] = {}
        self._receive_scripts: dict[int, Any] = {}
        self._receive_many_scripts: dict[int, Any] = {}
        # channel keys whose backup holds only what receive_many handed over
        self._handed_over: set[str] = set()

    async def receive_many(self, channel: str, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` messages for ``channel``, at least one, oldest first.

        What waits comes in one round trip (``receive`` takes one per message,
        and a second to clear its backup), so a receiver that fell behind
        catches up in batches. For a process-specific channel (``hub.…!…``)
        that one coroutine of the process receives from, as the hub does; any
        other channel, or another channels-redis version, gets one ``receive``.
        """
        if not self.batched or "!" not in channel:
            return [await self.receive(channel)]
        buffered = self.receive_buffer.get(channel)
        if buffered is not None and not buffered.empty():
            # Left by an earlier receive() of this process: those come first.
            messages: list[dict[str, Any]] = []
            while not buffered.empty() and len(messages) < limit:
                messages.append(buffered.get_nowait())
            del self.receive_buffer[channel]
            return messages
        real_channel = self.non_local_name(channel)
        index = self.consistent_hash(real_channel)
        key = self.prefix + real_channel
        backup = self._backup_channel_name(key)
        connection = self.connection(index)
        script = self._receive_many_scripts.get(index)
        if script is None:
            script = connection.register_script(_RECEIVE_MANY)
            self._receive_many_scripts[index] = script
        while True:
            handed_over = key in self._handed_over
            self._handed_over.discard(key)
            members = await script(
                keys=[key, backup],
                args=[limit, 1 if handed_over else 0],
                client=connection,
            )
            if not members:
                # Nothing waits: block until something comes, as upstream does.
                result = await connection.bzpopmin(key, timeout=self.brpop_timeout)
                if result is None:
                    continue
                _, member, timestamp = result
                await connection.zadd(backup, {member: float(timestamp)})
                members = [member]
            messages = []
            for member in members:
                message = self.deserialize(member)
                # A group message names every channel of this process it is
                # for; another receiver's copy waits for it, as upstream.
                targets = message.pop("__asgi_channel__", channel)
                if not isinstance(targets, list):
                    targets = [targets]
                for target in targets:
                    if target == channel:
                        messages.append(message)
                    else:
                        self.receive_buffer[target].put_nowait(message)
            # No await from the pop to here: what the backup holds is ours now.
            self._handed_over.add(key)
            if messages:
                return messages

    async def _brpop_with_clean(
        self, index: int, channel: str, timeout: float
    ) -> bytes | None:
        if not self.batched:
            return await super()._brpop_with_clean(index, channel, timeout)
        backup = self._backup_channel_name(channel)
        connection = self.connection(index)
        script = self._receive_scripts.get(index)
        if script is None:
            script = self._receive_scripts[index] = connection.register_script(_RECEIVE)
        member = await script(keys=[channel, backup], client=connection)
        if member is not None:
            return member
        # Nothing waits: block until something comes, as upstream does.
        result = await connection.bzpopmin(channel, timeout=timeout)
        if result is None:
            return None
        _, member, timestamp = result
        await connection.zadd(backup, {member: float(timestamp)})
        return member

    async def group_add(self, group: str, channel: str) -> None:
        if not self.batched:
            return await super().group_add(group, channel)
        assert self.require_valid_group_name(group), "Group name not valid"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        key = self._group_key(group)
        connection = self.connection(self.consistent_hash(group))
        async with connection.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {channel: time.time()})
            pipe.expire(key, self.group_expiry)
            await pipe.execute()

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        if not self.batched:
            return await super().group_send(group, message)
        assert self.require_valid_group_name(group), "Group name not valid"
        key = self._group_key(group)
        connection = self.connection(self.consistent_hash(group))
        async with connection.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, min=0, max=int(time.time()) - self.group_expiry)
            pipe.zrange(key, 0, -1)
            _, members = await pipe.execute()
        channel_names = [member.decode("utf8") for member in members]
        by_connection, messages, capacities = self._map_channel_keys_to_connection(
            channel_names, message
        )
        now = time.time()
        for index, keys in by_connection.items():
            args = [messages[k] for k in keys] + [capacities[k] for k in keys]
            args += [now, self.expiry, int(now) - int(self.expiry)]
            over_capacity = await self._group_send_script(index)(
                keys=keys, args=args, client=self.connection(index)
            )
            if over_capacity > 0:
                logger.info(
                    "%s of %s channels over capacity in group %s",
                    over_capacity,
                    len(channel_names),
                    group,
                )

    def _group_send_script(self, index: int) -> Any:
        # Registered once per shard: later calls send its SHA, not its text.
        script = self._group_send_scripts.get(index)
        if script is None:
            script = self.connection(index).register_script(_GROUP_SEND)
            self._group_send_scripts[index] = script
        return script
