import pytest

from chat import services

pytestmark = pytest.mark.django_db(transaction=True)


async def test_two_users_chat(make_user, connect):
    from asgiref.sync import sync_to_async
    alice = await sync_to_async(make_user)("alice")
    bob = await sync_to_async(make_user)("bob")
    await sync_to_async(services.room_create)(slug="lobby", title="Lobby")
    a = await connect(alice)
    b = await connect(bob)
    print(a.hello)
    print(await a.join("lobby", ref="j1"))
    print(await b.join("lobby"))
    print(await a.recv())
    await a.send(type="send", room="lobby", body="hi", client_msg_id="m1", ref="s1")
    print(await a.recv()); print(await a.recv()); print(await b.recv())
