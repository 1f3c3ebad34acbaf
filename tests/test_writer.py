"""Group commit: the sends waiting at one moment are stored together, in order."""

import asyncio

import pytest
import redis
from asgiref.sync import sync_to_async
from django.db import IntegrityError

from chat import services, writer
from chat.models import Message
from chat.protocol import ChatError
from tests.ports import free_port
from tests.servers import this_process_uses_redis

pytestmark = pytest.mark.django_db(transaction=True)


async def test_sends_queued_at_once_are_stored_in_their_order_past_one_batch(
    alice, lobby
):
    count = writer.MAX_BATCH + 44
    queue = writer.get_writer()
    futures = [
        queue.enqueue(services.SendRequest(lobby, alice, f"m{i}", f"c{i}"))
        for i in range(count)
    ]
    results = await asyncio.gather(*futures)
    assert [(m.seq, m.body, created) for m, created in results] == [
        (i + 1, f"m{i}", True) for i in range(count)
    ]
    stored = await sync_to_async(list)(
        Message.objects.order_by("seq").values_list("seq", "client_msg_id")
    )
    assert stored == [(i + 1, f"c{i}") for i in range(count)]


async def test_a_refused_send_fails_alone_and_its_batch_is_stored(alice, bob, lobby):
    await sync_to_async(services.user_mute)(user=bob, room=lobby, reason="hush")
    queue = writer.get_writer()
    first = queue.submit(services.SendRequest(lobby, alice, "one", "a1"))
    muted = queue.submit(services.SendRequest(lobby, bob, "shh", "b1"))
    second = queue.submit(services.SendRequest(lobby, alice, "two", "a2"))
    one, refusal, two = await asyncio.gather(
        first, muted, second, return_exceptions=True
    )
    assert (one[0].seq, two[0].seq) == (1, 2)
    assert isinstance(refusal, ChatError)
    assert (refusal.code, refusal.message) == (
        "muted",
        "you are muted in 'lobby': hush",
    )


async def test_a_retry_queued_with_its_original_returns_the_same_message(alice, lobby):
    queue = writer.get_writer()
    original = queue.enqueue(services.SendRequest(lobby, alice, "hi", "same"))
    retry = queue.enqueue(services.SendRequest(lobby, alice, "hi", "same"))
    (message, created), (again, created_again) = await asyncio.gather(original, retry)
    assert (message.pk, created, created_again) == (again.pk, True, False)
    assert await sync_to_async(Message.objects.count)() == 1


async def test_each_event_loop_has_its_own_writer():
    here = writer.get_writer()
    assert writer.get_writer() is here
    elsewhere = await asyncio.to_thread(asyncio.run, _writer_of_a_new_loop())
    assert elsewhere is not here


async def _writer_of_a_new_loop():
    return writer.get_writer()


async def test_a_send_the_database_refuses_fails_alone_in_its_batch(alice, bob, lobby):
    # A user deleted after their socket joined: the insert breaks the foreign
    # key, at commit, for the whole batch; the others must still be stored.
    ghost = type(alice)(pk=987654, username="ghost")
    queue = writer.get_writer()
    futures = [
        queue.enqueue(services.SendRequest(lobby, alice, "one", "a1")),
        queue.enqueue(services.SendRequest(lobby, ghost, "boo", "g1")),
        queue.enqueue(services.SendRequest(lobby, bob, "two", "b1")),
    ]
    one, refused, two = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(refused, IntegrityError)
    assert [(m.seq, m.body) for m, _ in (one, two)] == [(1, "one"), (2, "two")]
    stored = await sync_to_async(list)(
        Message.objects.order_by("seq").values_list("seq", "author__username")
    )
    assert stored == [(1, "alice"), (2, "bob")]


async def test_a_batch_whose_broadcast_fails_after_commit_fails_every_send(
    alice, bob, lobby
):
    # Nothing listens on this port: a Redis that is down. The batch commits,
    # then its after-commit broadcast raises. A retry one by one would find the
    # messages stored and return them as retries, acknowledged with no
    # broadcast and no word logged; every send fails as a lone one does.
    with this_process_uses_redis(f"redis://127.0.0.1:{free_port()}/0"):
        queue = writer.get_writer()
        futures = [
            queue.enqueue(services.SendRequest(lobby, alice, "one", "a1")),
            queue.enqueue(services.SendRequest(lobby, bob, "two", "b1")),
            queue.enqueue(services.SendRequest(lobby, alice, "three", "a2")),
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert [type(result) for result in results] == [redis.ConnectionError] * 3
        stored = await sync_to_async(list)(
            Message.objects.order_by("seq").values_list("seq", "client_msg_id")
        )
        assert stored == [(1, "a1"), (2, "b1"), (3, "a2")]
        # The client's retry gets the stored message, as it would its ack.
        message, created = await queue.submit(
            services.SendRequest(lobby, alice, "one", "a1")
        )
    assert (message.seq, message.body, created) == (1, "one", False)
