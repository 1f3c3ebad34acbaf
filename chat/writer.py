"""Group commit for sends: one transaction for all the sends that are waiting.

While a batch is being stored, new sends queue up; the next batch takes all of
them. Nothing is acknowledged before its batch commits, and a lone send is
stored at once, so this adds no delay, only fewer transactions under load. A
send the database refuses fails alone; a database out of reach fails the batch
as ``unavailable``; a batch that fails after its commit (its broadcast) fails
every send, as a lone send would.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from channels.db import database_sync_to_async
from django.db import DatabaseError

from chat import logs, services
from chat.loops import PerLoop
from chat.protocol import ChatError

if TYPE_CHECKING:
    from chat.models import Message

MAX_BATCH = 256

# Sends waiting for a batch, in arrival order, with their futures.
Batch = list[tuple[services.SendRequest, asyncio.Future[services.SendResult]]]


class MessageWriter:
    def __init__(self) -> None:
        self.pending: Batch = []
        self.task: asyncio.Task[None] | None = None

    def enqueue(
        self, request: services.SendRequest
    ) -> asyncio.Future[services.SendResult]:
        """Queue ``request`` (a ``services.SendRequest``) now, in arrival order.

        The future resolves, after commit, to (message, created) or a ChatError.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[services.SendResult] = loop.create_future()
        self.pending.append((request, future))
        if self.task is None or self.task.done():
            # One drain for every socket's sends: no socket's log context.
            self.task = loop.create_task(
                self._drain(), context=logs.context_without_connection()
            )
        return future

    async def submit(self, request: services.SendRequest) -> tuple[Message, bool]:
        """Store ``request``; return (message, created) or raise its ChatError."""
        result = await self.enqueue(request)
        if isinstance(result, ChatError):
            raise result
        return result

    async def _drain(self) -> None:
        store = database_sync_to_async(services.message_create_many)
        while self.pending:
            batch = self.pending[:MAX_BATCH]
            del self.pending[:MAX_BATCH]
            try:
                results = await store(requests=[request for request, _ in batch])
            except Exception as exc:
                if len(batch) > 1 and _refused_by_database(exc):
                    # One request the database refuses must not fail the
                    # others: the transaction rolled back, so store them one
                    # by one, in order, and it fails alone.
                    await self._store_one_by_one(batch)
                    continue
                # Out of reach: refused as unavailable, none retried into the
                # outage. Raised after the commit (a broadcast that could not
                # leave): a retry would find the messages stored and answer
                # them as acknowledged, broadcast to nobody. Either way every
                # send of the batch fails as a lone one does.
                for _, future in batch:
                    _settle(future, exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                _settle(future, result)

    async def _store_one_by_one(self, batch: Batch) -> None:
        store = database_sync_to_async(services.message_create_many)
        for request, future in batch:
            try:
                [result] = await store(requests=[request])
            except Exception as alone:
                _settle(future, alone)
            else:
                _settle(future, result)


def _refused_by_database(exc: Exception) -> bool:
    """Whether the database refused the batch (rolled back) while within reach."""
    return isinstance(exc, DatabaseError) and not services.database_outage_error(exc)


def _settle(
    future: asyncio.Future[services.SendResult],
    outcome: services.SendResult | Exception,
) -> None:
    """Resolve a send's future, unless its waiter is gone (cancelled)."""
    if future.done():
        return
    if isinstance(outcome, Exception):
        outcome = services.database_outage_error(outcome) or outcome
    if isinstance(outcome, Exception) and not isinstance(outcome, ChatError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


_writers: PerLoop[MessageWriter] = PerLoop(MessageWriter)


def get_writer() -> MessageWriter:
    """The running loop's writer."""
    return _writers.get()
