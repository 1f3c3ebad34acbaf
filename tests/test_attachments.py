"""Attachments: POST /api/uploads, attaching to a send, and who may GET them."""

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from chat import services
from chat.models import Message, Upload
from tests.test_consumers import error_frame
from tests.test_multiprocess import stored_message

pytestmark = pytest.mark.django_db(transaction=True)

adb = sync_to_async
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = str(tmp_path)
    return tmp_path


def upload(client, content, name="pic.png", declared="text/plain", **headers):
    return client.post(
        "/api/uploads",
        {"file": SimpleUploadedFile(name, content, content_type=declared)},
        **headers,
    )


def bearer(key):
    return {"HTTP_AUTHORIZATION": f"Bearer {key}"}


def test_an_upload_is_typed_by_its_bytes_not_by_what_the_browser_says(alice, token_for):
    response = upload(Client(), PNG, **bearer(token_for(alice)))
    assert response.status_code == 201
    stored = Upload.objects.get()
    assert response.json() == {
        "id": stored.pk,
        "name": "pic.png",
        "size": len(PNG),
        "content_type": "image/png",
        "url": f"/uploads/{stored.pk}/pic.png",
    }
    assert (stored.owner, stored.message) == (alice, None)
    assert stored.file.read() == PNG
    # A path in the name is dropped; unknown bytes are a download.
    other = upload(
        Client(), b"\x00\x01\x02", name="../../x.exe", **bearer(token_for(alice))
    )
    assert other.json()["name"] == "x.exe"
    assert other.json()["content_type"] == "application/octet-stream"


def test_a_session_upload_needs_its_csrf_token_and_nobody_gets_none(alice):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    refused = upload(browser, PNG)
    assert (refused.status_code, refused.json()) == (
        403,
        {"error": "the CSRF token is missing or wrong"},
    )
    browser.get("/")  # the room list sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    assert upload(browser, PNG, HTTP_X_CSRFTOKEN=token).status_code == 201
    anonymous = upload(Client(), PNG)
    assert anonymous.status_code == 401
    assert upload(Client(), PNG, **bearer("cs_not-a-token")).status_code == 401
    missing = Client().post(
        "/api/uploads", {}, **bearer(services.api_token_create(user=alice)[1])
    )
    assert (missing.status_code, missing.json()) == (
        400,
        {"error": "send the file as the multipart field 'file'"},
    )


def test_a_file_over_the_limit_is_413_and_not_stored(alice, token_for, settings):
    settings.CHAT_MAX_UPLOAD_BYTES = 100
    response = upload(Client(), b"x" * 101, **bearer(token_for(alice)))
    assert (response.status_code, response.json()) == (
        413,
        {"error": "the file is over 100 bytes"},
    )
    assert upload(Client(), b"x" * 100, **bearer(token_for(alice))).status_code == 201
    assert Upload.objects.count() == 1


def test_a_file_past_djangos_in_memory_body_limit_uploads_and_one_past_ours_is_413(
    alice, token_for, settings
):
    # 3 MB: over DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB), which a body read whole
    # would hit; under CHAT_MAX_UPLOAD_BYTES.
    settings.CHAT_MAX_UPLOAD_BYTES = 4_000_000
    big = b"y" * 3_000_000
    response = upload(Client(), big, name="big.txt", **bearer(token_for(alice)))
    assert response.status_code == 201
    assert Upload.objects.get().file.size == 3_000_000
    over = upload(
        Client(), b"z" * 4_200_000, name="huge.txt", **bearer(token_for(alice))
    )
    assert (over.status_code, over.json()) == (
        413,
        {"error": "the file is over 4000000 bytes"},
    )
    assert Upload.objects.count() == 1


async def uploaded(user, content=PNG, name="pic.png"):
    key = await adb(services.api_token_create)(user=user)
    response = await adb(upload)(Client(), content, name=name, **bearer(key[1]))
    assert response.status_code == 201
    return response.json()


async def send_with(client, files, msg_id, room="lobby", body="see this"):
    await client.send(
        type="send",
        room=room,
        body=body,
        client_msg_id=msg_id,
        ref=msg_id,
        attachments=files,
    )
    reply = await client.recv()
    if reply["type"] == "error":
        return reply
    other = await client.recv()
    return reply if reply["type"] == "ack" else other


async def test_a_send_attaches_the_senders_own_uploads_once(connect, alice, bob, lobby):
    picture = await uploaded(alice)
    notes = await uploaded(alice, b"meeting notes", name="notes.txt")
    bobs = await uploaded(bob)
    a = await connect(alice)
    await a.join("lobby")
    ack = await send_with(a, [picture["id"], notes["id"]], "a1")
    stored = await stored_message("lobby", ack["seq"])
    assert stored["attachments"] == [picture, {**notes, "content_type": "text/plain"}]
    message = await adb(Message.objects.get)(pk=ack["id"])
    assert await adb(list)(
        message.attachments.order_by("pk").values_list("pk", flat=True)
    ) == [
        picture["id"],
        notes["id"],
    ]
    again = await send_with(a, [picture["id"]], "a2")
    assert again == error_frame(
        "not_found", f"no upload {picture['id']} of yours to attach", ref="a2"
    )
    theirs = await send_with(a, [bobs["id"]], "a3")
    assert theirs == error_frame(
        "not_found", f"no upload {bobs['id']} of yours to attach", ref="a3"
    )
    too_many = await a.request(
        type="send",
        room="lobby",
        body="x",
        client_msg_id="a4",
        attachments=list(range(1, 12)),
    )
    assert (too_many["type"], too_many["code"]) == ("error", "bad_request")
    assert await adb(Message.objects.count)() == 1


async def test_an_attachment_is_served_to_readers_of_its_room_only(
    connect, alice, bob, make_user
):
    carol = await adb(make_user)("carol")
    await adb(services.room_create)(
        slug="staff", title="Staff", is_private=True, creator=alice
    )
    staff = await adb(services.selectors.room_get)(slug="staff")
    await adb(services.membership_add)(room=staff, user=bob)
    picture = await uploaded(alice)
    url = picture["url"]

    def get_as(user):
        client = Client()
        if user is not None:
            client.force_login(user)
        return client.get(url)

    # Before it is attached, only its owner may see it.
    assert (await adb(get_as)(alice)).status_code == 200
    assert (await adb(get_as)(bob)).status_code == 403
    a = await connect(alice)
    await a.join("staff")
    ack = await send_with(a, [picture["id"]], "a1", room="staff")
    served = await adb(get_as)(bob)
    assert (served.status_code, served["Content-Type"], served.content) == (
        200,
        "image/png",
        PNG,
    )
    assert served["X-Content-Type-Options"] == "nosniff"
    assert served["Content-Disposition"] == "inline; filename*=UTF-8''pic.png"
    # To carol, no member of the private room, it is no file, as the room is no
    # room; to nobody signed in it is a file to sign in for.
    assert (await adb(get_as)(carol)).status_code == 404
    assert (await adb(get_as)(None)).status_code == 403
    assert (await adb(Client().get)("/uploads/999/pic.png")).status_code == 404
    assert (
        await adb(Client().get)(f"/uploads/{picture['id']}/other.png")
    ).status_code == 404
    # Deleted for everyone: its files go with it.
    await a.send(type="delete", room="staff", id=ack["id"], ref="d")
    await a.recv()
    assert (await adb(get_as)(bob)).status_code == 404
    assert (await stored_message("staff", 1))["attachments"] == []


async def test_an_attachment_of_a_public_room_is_403_to_a_user_banned_from_it(
    connect, alice, bob, lobby
):
    picture = await uploaded(alice)
    a = await connect(alice)
    await a.join("lobby")
    await send_with(a, [picture["id"]], "a1")
    await adb(services.room_ban)(user=bob, room=lobby, reason="spam")
    client = Client()
    await adb(client.force_login)(bob)

    response = await adb(client.get)(picture["url"])

    assert (response.status_code, response.json()) == (
        403,
        {"error": "you may not read this file"},
    )


async def test_with_accel_redirect_nginx_sends_the_file(
    connect, alice, lobby, settings
):
    settings.CHAT_ACCEL_REDIRECT = "/protected-uploads/"
    picture = await uploaded(alice)
    a = await connect(alice)
    await a.join("lobby")
    await send_with(a, [picture["id"]], "a1")
    stored = await adb(Upload.objects.get)(pk=picture["id"])
    client = Client()
    await adb(client.force_login)(alice)
    response = await adb(client.get)(picture["url"])
    assert response.status_code == 200
    assert response["X-Accel-Redirect"] == "/protected-uploads/" + stored.file.name
    assert response.content == b""


def test_chat_uploads_clean_deletes_old_unattached_uploads_and_their_files(
    alice, token_for, media_root, capsys
):
    key = token_for(alice)
    old, fresh, attached = (
        Upload.objects.get(pk=upload(Client(), PNG, **bearer(key)).json()["id"])
        for _ in range(3)
    )
    room = services.room_create(slug="lobby", title="Lobby")
    services.message_create(
        room=room, author=alice, body="x", client_msg_id="c1", attachments=[attached.pk]
    )
    long_ago = timezone.now() - timedelta(hours=25)
    Upload.objects.filter(pk__in=[old.pk, attached.pk]).update(created_at=long_ago)
    call_command("chat_uploads_clean")
    assert capsys.readouterr().out == "Deleted 1 unattached upload(s).\n"
    assert sorted(Upload.objects.values_list("pk", flat=True)) == [
        fresh.pk,
        attached.pk,
    ]
    assert not old.file.storage.exists(old.file.name)
    assert attached.file.storage.exists(attached.file.name)
