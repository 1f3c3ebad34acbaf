"""Debian's nginx with deploy/nginx-chatsite.conf in front of two daphne processes.

The module starts its own redis-server, two daphne processes on it (behind a TLS
proxy, as in production) and ``/usr/sbin/nginx`` in a directory of its own, as
an ordinary process (no daemon, no system-wide configuration). nginx runs the
committed site file itself, rendered with only its ports, the upstream's
addresses and its paths (certificate, static root) replaced; TLS uses a
self-signed certificate made for the module. Clients are ``ChatClient``s with
API tokens, real WebSocket connections through nginx (wss).
"""

import asyncio
import datetime
import http.client
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.contrib.auth import get_user_model
from prometheus_client import CONTENT_TYPE_LATEST

from chat import protocol, services
from chat.client import ChatError
from chat.models import Message
from tests.clients import process_of
from tests.ports import free_port, wait_for_port
from tests.servers import (
    ROOT,
    SECRET_KEY,
    DaphneServer,
    RedisServer,
    require_binary,
)
from tests.waiting import until

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

DEPLOY = ROOT / "deploy"
SITE = DEPLOY / "nginx-chatsite.conf"
HEARTBEAT = 2  # seconds
TIMEOUT = 5  # seconds to wait for a frame that should come
QUIET = 0.4  # seconds of silence that show a frame does not come
# What a room member may get before the close of a server going away.
ROOM_FRAMES = ("message", "presence", "presence_batch", "typing")
# What nginx answers itself for a refused path (server_tokens off).
NGINX_404 = (
    b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n"
    b"<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


# --- servers -------------------------------------------------------------------


def nginx_binary():
    if os.access("/usr/sbin/nginx", os.X_OK):
        return "/usr/sbin/nginx"
    return require_binary("nginx")


def render(text, replacements):
    """``text`` with each key replaced; every key must occur in it."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is not in {SITE.name} any more"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="chatsite-nginx-") as directory:
        path = Path(directory)
        # nginx's workers run as nobody when the test runs as root: they read
        # the static files from here.
        path.chmod(0o755)
        yield path


@pytest.fixture(scope="module")
def certificate(workdir):
    """A self-signed certificate for 127.0.0.1: (certificate path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls(certificate):
    """A client TLS context that trusts only the module's certificate."""
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture(scope="module")
def static_root(workdir):
    """``manage.py collectstatic`` into a directory of the module's own.

    The settings are chatsite's, but for STATIC_ROOT (settings.py puts it in the
    checkout, which the test leaves alone).
    """
    root = workdir / "staticfiles"
    (workdir / "collect_settings.py").write_text(
        f"from chatsite.settings import *  # noqa: F403\nSTATIC_ROOT = {str(root)!r}\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "collect_settings",
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT)]),
    }
    env.pop("REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return root


@pytest.fixture(scope="module")
def media_root(workdir):
    """The processes' CHAT_MEDIA_ROOT, which nginx's workers read files from."""
    root = workdir / "media"
    root.mkdir(mode=0o755)
    return root


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def daphne_pair(django_db_setup, django_db_blocker, redis_server, media_root):
    servers = []
    try:
        for _ in range(2):
            # database_url() reads the test database's connection settings.
            with django_db_blocker.unblock():
                server = DaphneServer(
                    redis_url=redis_server.url,
                    heartbeat=HEARTBEAT,
                    verbosity=0,
                    extra_env={
                        "DJANGO_BEHIND_TLS_PROXY": "1",
                        "CHAT_MEDIA_ROOT": str(media_root),
                        "CHAT_ACCEL_REDIRECT": "/protected-uploads/",
                    },
                )
            servers.append(server.start())
        yield servers
    finally:
        for server in servers:
            server.stop()


class Nginx:
    """nginx in ``workdir``, running the site file for the given ports and paths."""

    def __init__(self, workdir, *, upstreams, certificate, static_root, media_root):
        self.binary = nginx_binary()
        self.dir = workdir / "nginx"
        self.dir.mkdir()
        self.http_port = free_port()
        self.https_port = free_port()
        cert, key = certificate
        site = render(
            SITE.read_text(),
            {
                "server 127.0.0.1:8001 ": f"server 127.0.0.1:{upstreams[0]} ",
                "server 127.0.0.1:8002 ": f"server 127.0.0.1:{upstreams[1]} ",
                "listen 80;": f"listen 127.0.0.1:{self.http_port};",
                "listen 443 ssl;": f"listen 127.0.0.1:{self.https_port} ssl;",
                "/etc/letsencrypt/live/chat.example.com/fullchain.pem": str(cert),
                "/etc/letsencrypt/live/chat.example.com/privkey.pem": str(key),
                "/srv/chatsite/app/staticfiles/": f"{static_root}/",
                "/srv/chatsite/media/": f"{media_root}/",
            },
        )
        (self.dir / "chatsite.conf").write_text(site)
        # What Debian's nginx.conf gives the site, with every path in self.dir.
        temp = "\n".join(
            f"    {name}_temp_path {self.dir / name};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(
            f"""worker_processes 2;
pid {self.dir / "nginx.pid"};
error_log {self.dir / "error.log"} info;
events {{
    worker_connections 512;
}}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {self.dir / "access.log"};
{temp}
    include {self.dir / "chatsite.conf"};
}}
"""
        )
        self.process = None

    def start(self):
        command = [self.binary, "-p", str(self.dir), "-c", str(self.conf)]
        checked = subprocess.run(
            [*command, "-e", "stderr", "-t"], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stderr
        self.process = subprocess.Popen(
            [*command, "-e", "stderr", "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.https_port, self.process)
            wait_for_port(self.http_port, self.process)
        except RuntimeError:
            raise RuntimeError(f"nginx did not start:\n{self.output()}") from None
        return self

    def output(self):
        try:
            return (self.dir / "error.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(scope="module")
def nginx(workdir, daphne_pair, certificate, static_root, media_root):
    server = Nginx(
        workdir,
        upstreams=[daphne.port for daphne in daphne_pair],
        certificate=certificate,
        static_root=static_root,
        media_root=media_root,
    ).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def server_logs(request):
    """Check nginx and both daphnes outlive each test; show what they logged."""
    if "nginx" not in request.fixturenames:
        yield  # a test of the files alone
        return
    nginx = request.getfixturevalue("nginx")
    daphne_pair = request.getfixturevalue("daphne_pair")
    starts = [len(server.output()) for server in daphne_pair]
    yield
    print(f"--- nginx error log ---\n{nginx.output()}")
    for name, server, start in zip("AB", daphne_pair, starts, strict=True):
        print(f"--- daphne {name} log during the test ---\n{server.output()[start:]}")
    assert nginx.process.poll() is None, f"nginx died:\n{nginx.output()}"
    for name, server in zip("AB", daphne_pair, strict=True):
        assert server.alive(), f"daphne {name} died:\n{server.output()}"


# --- data ----------------------------------------------------------------------


@database_sync_to_async
def user_with_key(username):
    """A new user and the key of an API token of theirs."""
    user = get_user_model().objects.create_user(username=username)
    return user, services.api_token_create(user=user)[1]


@database_sync_to_async
def room_create(slug):
    return services.room_create(slug=slug, title=f"Room {slug}")


@database_sync_to_async
def stored_message(slug, seq):
    """The ``message`` frame of the stored message ``seq`` of the room ``slug``."""
    message = Message.objects.select_related("author").get(room__slug=slug, seq=seq)
    return {
        "type": "message",
        "room": slug,
        "id": message.pk,
        "seq": seq,
        "user": {"id": message.author.pk, "username": message.author.username},
        "body": message.body,
        "created_at": protocol.timestamp(message.created_at),
        "client_msg_id": message.client_msg_id,
        "edited_at": None,
        "deleted": False,
        "mentions": [],
        "reactions": [],
        "reply_to": None,
        "reply_count": 0,
        "attachments": [],
    }


def joined_frame(slug, *, online, last_seq=0, read_seq=0, unread=0, **extra):
    """The ``joined`` frame of a public, open room made by ``room_create``."""
    return {
        "type": "joined",
        "room": slug,
        "title": f"Room {slug}",
        "last_seq": last_seq,
        "online": online,
        "online_count": len(online),
        "read_seq": read_seq,
        "unread": unread,
        "mentions": 0,
        "private": False,
        "direct": False,
        "closed": False,
        **extra,
    }


def presence(room, user, status):
    return {"type": "presence", "room": room, "user": user, "status": status}


# --- clients -------------------------------------------------------------------


@pytest.fixture
async def open_client(nginx, daphne_pair, tls, chat_client):
    """``await open_client(key, name)``: a ``ChatClient`` through nginx (wss),
    read in order, pinging every half heartbeat.

    ``direct=server`` connects to that daphne process instead, on loopback.
    """

    def logs():
        parts = [f"--- nginx ---\n{nginx.output()}"]
        for name, server in zip("AB", daphne_pair, strict=True):
            parts.append(f"--- daphne {name} ---\n{server.output()[-3000:]}")
        return "\n".join(parts)

    async def open_(key, name, *, direct=None):
        if direct is None:
            url, context = f"wss://127.0.0.1:{nginx.https_port}/ws/", tls
        else:
            url, context = direct.ws_url, None
        try:
            return await chat_client(
                nginx,
                key,
                name=name,
                url=url,
                ssl=context,
                explain=logs,
                keepalive=HEARTBEAT / 2,
            )
        except (ChatError, OSError, TimeoutError) as exc:
            raise AssertionError(
                f"{name} could not connect: {exc!r}\n{logs()}"
            ) from exc

    return open_


async def send(client, **frame):
    await client.send(frame)


async def recv(client):
    """The next frame (keep-alive pongs never come: ChatClient drops them)."""
    return await client.next_frame(TIMEOUT)


async def expect(client, frame_type, *, skip=()):
    return await client.expect(frame_type, skip=skip, timeout=TIMEOUT)


async def nothing(client):
    await client.nothing(QUIET)


async def closed(client):
    """(code, reason) of the close the server sent, after any room frames."""
    return await client.expect_close(skip=ROOM_FRAMES, timeout=TIMEOUT)


async def join(client, room, **extra):
    await send(client, type="join", room=room, **extra)
    return await expect(client, "joined")


async def process_id(open_client, server, key):
    """The id a daphne process puts before the dash of its connection ids."""
    probe = await open_client(key, "probe", direct=server)
    await probe.close()
    return process_of(probe)


def https_get(nginx, tls, path, *, port=None, scheme="https", headers=None):
    """(status, headers as a dict of lower-case names, body) of a GET through nginx."""
    if scheme == "https":
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port or nginx.https_port, context=tls, timeout=TIMEOUT
        )
    else:
        conn = http.client.HTTPConnection(
            "127.0.0.1", port or nginx.http_port, timeout=TIMEOUT
        )
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        got = {name.lower(): value for name, value in response.getheaders()}
        return response.status, got, response.read()
    finally:
        conn.close()


# --- tests -----------------------------------------------------------------------


async def test_two_clients_through_nginx_land_on_both_processes_and_chat(
    daphne_pair, open_client
):
    alice, alice_key = await user_with_key("alice")
    _, bob_key = await user_with_key("bob")
    _, carol_key = await user_with_key("carol")
    processes = {
        await process_id(open_client, server, alice_key) for server in daphne_pair
    }
    assert len(processes) == 2
    await room_create("lobby")

    on_alice = await open_client(alice_key, "alice")
    on_bob = await open_client(bob_key, "bob")
    # The second socket goes to the process without the first.
    assert {process_of(on_alice), process_of(on_bob)} == processes
    assert await join(on_alice, "lobby", ref="j1") == joined_frame(
        "lobby", online=["alice"], ref="j1"
    )
    assert await join(on_bob, "lobby", ref="j2") == joined_frame(
        "lobby", online=["alice", "bob"], ref="j2"
    )
    assert await recv(on_alice) == presence("lobby", "bob", "online")

    await send(
        on_alice,
        type="send",
        room="lobby",
        body="hello via nginx",
        client_msg_id="c-1",
        ref="s1",
    )

    received = await recv(on_bob)
    expected = await stored_message("lobby", 1)
    assert expected == {
        **expected,
        "user": {"id": alice.pk, "username": "alice"},
        "body": "hello via nginx",
        "client_msg_id": "c-1",
    }
    assert received == expected
    own = sorted([await recv(on_alice), await recv(on_alice)], key=lambda f: f["type"])
    assert own == [
        {
            "type": "ack",
            "ref": "s1",
            "room": "lobby",
            "client_msg_id": "c-1",
            "id": expected["id"],
            "seq": 1,
        },
        expected,
    ]
    await nothing(on_bob)

    # least_conn, not round robin: with bob gone, the next socket goes to the
    # process he left, where round robin would take its turn on alice's.
    await on_bob.close()
    on_carol = await open_client(carol_key, "carol")
    assert process_of(on_carol) == process_of(on_bob)


async def test_a_client_of_a_stopped_process_reconnects_through_nginx_and_recovers(
    nginx, tls, daphne_pair, open_client
):
    keys = {name: (await user_with_key(name))[1] for name in ["alice", "bob", "carol"]}
    ids = [await process_id(open_client, s, keys["carol"]) for s in daphne_pair]
    await room_create("restart")
    alice = await open_client(keys["alice"], "alice")
    bob = await open_client(keys["bob"], "bob")
    assert {process_of(alice), process_of(bob)} == set(ids)
    bobs_server = daphne_pair[ids.index(process_of(bob))]
    await join(alice, "restart")
    await join(bob, "restart")
    assert await recv(alice) == presence("restart", "bob", "online")
    await send(alice, type="send", room="restart", body="seen", client_msg_id="r1")
    await expect(alice, "ack", skip=("message",))
    assert (await expect(bob, "message"))["seq"] == 1

    try:
        bobs_server.stop()  # SIGTERM: its sockets are closed with 1001
        assert await closed(bob) == (1001, "server shutting down")
        assert await expect(alice, "presence", skip=("message",)) == presence(
            "restart", "bob", "offline"
        )
        for n in (2, 3):
            await send(
                alice,
                type="send",
                room="restart",
                body=f"missed {n}",
                client_msg_id=f"r{n}",
            )
            assert (await expect(alice, "ack", skip=("message",)))["seq"] == n

        # The same address through nginx: the stopped process refuses, nginx
        # tries the other.
        bob = await open_client(keys["bob"], "bob again")
        assert process_of(bob) == process_of(alice)
        # Bob never sent read: alice's three messages are unread to him.
        assert await join(bob, "restart", since=1, ref="rejoin") == joined_frame(
            "restart", online=["alice", "bob"], last_seq=3, unread=3, ref="rejoin"
        )
        for seq in (2, 3):
            expected = await stored_message("restart", seq)
            assert expected["body"] == f"missed {seq}"
            assert await recv(bob) == expected
        assert await recv(bob) == {
            "type": "recovered",
            "room": "restart",
            "complete": True,
        }
        await nothing(bob)
        # Pages too go to the process that is up.
        status, _, body = await asyncio.to_thread(https_get, nginx, tls, "/healthz")
        assert (status, body) == (200, b"ok")
    finally:
        if not bobs_server.alive():
            bobs_server.start()  # the same port, a new process id

    # Once nginx takes the restarted process back (fail_timeout), a new socket
    # goes there: the other holds alice's and bob's.
    restarted = await process_id(open_client, bobs_server, keys["carol"])
    assert restarted not in ids

    async def probe():
        client = await open_client(keys["carol"], "carol probe")
        if process_of(client) == restarted:
            return client
        await client.close()
        return None

    carol = await until(
        probe, lambda c: c is not None, timeout=15, what="a socket on the restarted"
    )
    assert (await join(carol, "restart"))["online"] == ["alice", "bob", "carol"]
    await send(alice, type="send", room="restart", body="back", client_msg_id="r4")
    message = await expect(carol, "message", skip=("presence",))
    expected = await stored_message("restart", 4)
    assert expected["body"] == "back"
    assert message == expected


def https_upload(nginx, tls, key, name, content):
    """POST /api/uploads through nginx with a bearer token: (status, JSON)."""
    boundary = "chatsite-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    conn = http.client.HTTPSConnection(
        "127.0.0.1", nginx.https_port, context=tls, timeout=TIMEOUT
    )
    try:
        conn.request(
            "POST",
            "/api/uploads",
            body=body,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": f"multipart/form-data; boundary={boundary}",
            },
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


async def test_an_attachment_goes_through_the_app_s_check_then_nginx_sends_it(
    nginx, tls, open_client
):
    alice, alice_key = await user_with_key("alice")
    _, bob_key = await user_with_key("bob")
    await room_create("files")
    picture = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # 10 KiB
    status, attachment = await asyncio.to_thread(
        https_upload, nginx, tls, alice_key, "chart.png", picture
    )
    assert (status, attachment["content_type"]) == (201, "image/png")
    client = await open_client(alice_key, "alice")
    await join(client, "files")
    await send(
        client,
        type="send",
        room="files",
        body="the chart",
        client_msg_id="c1",
        attachments=[attachment["id"]],
    )
    assert (await expect(client, "ack", skip=("message",)))["room"] == "files"
    # Bob may read the public room: the app says yes, nginx sends the bytes
    # (the app's own answer has no body at all).
    bearer = {"Authorization": f"Bearer {bob_key}"}
    status, headers, body = await asyncio.to_thread(
        https_get, nginx, tls, attachment["url"], headers=bearer
    )
    assert (status, headers["content-type"], body) == (200, "image/png", picture)
    assert "x-accel-redirect" not in headers
    # Nobody signed in: the app refuses; the internal location is not reachable.
    status, _, _ = await asyncio.to_thread(https_get, nginx, tls, attachment["url"])
    assert status == 403
    hidden = "/protected-uploads/" + attachment["url"].split("/")[-1]
    status, _, body = await asyncio.to_thread(https_get, nginx, tls, hidden)
    assert (status, body) == (404, NGINX_404)


def test_pages_answer_through_nginx_over_tls(nginx, tls):
    status, headers, body = https_get(nginx, tls, "/accounts/login/")
    assert status == 200
    assert b'name="csrfmiddlewaretoken"' in body
    # X-Forwarded-Proto reached Django: no redirect to HTTPS, and HSTS.
    assert headers["strict-transport-security"] == (
        "max-age=31536000; includeSubDomains; preload"
    )
    status, headers, _ = https_get(nginx, tls, "/")
    assert (status, headers["location"]) == (302, "/accounts/login/?next=/")
    # Plain HTTP is sent to HTTPS by nginx itself.
    status, headers, _ = https_get(nginx, tls, "/accounts/login/", scheme="http")
    assert (status, headers["location"]) == (301, "https://127.0.0.1/accounts/login/")


@pytest.mark.parametrize(
    "path", ["/metrics", "/metrics/", "/metrics?name=x", "//metrics", "/%6Detrics"]
)
def test_metrics_are_refused_by_nginx_itself(nginx, tls, path):
    status, headers, body = https_get(nginx, tls, path)
    assert (status, body) == (404, NGINX_404)
    assert headers["content-type"] == "text/html"


def test_metrics_are_served_to_nginx_s_own_address(daphne_pair):
    # Why nginx must refuse /metrics: each process serves it to loopback, the
    # address every request nginx forwards comes from.
    for server in daphne_pair:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/metrics", headers={"X-Forwarded-Proto": "https"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 200
        assert response.getheader("content-type") == CONTENT_TYPE_LATEST
        assert b"# TYPE chat_connections gauge\n" in body


def test_health_answers_through_nginx(nginx, tls):
    status, headers, body = https_get(nginx, tls, "/healthz")
    assert (status, headers["content-type"], body) == (
        200,
        "text/plain; charset=utf-8",
        b"ok",
    )


def test_static_files_come_from_nginx(nginx, tls, static_root):
    collected = static_root / "chat" / "chat.js"
    source = ROOT / "chat" / "static" / "chat" / "chat.js"
    assert collected.read_bytes() == source.read_bytes()
    status, headers, body = https_get(nginx, tls, "/static/chat/chat.js")
    assert (status, body) == (200, collected.read_bytes())
    assert headers["content-type"] == "application/javascript"
    assert headers["cache-control"] == "max-age=3600"
    # nginx's own ETag (last modified, length in hex); Django's static view
    # sends none.
    stat = collected.stat()
    assert headers["etag"] == f'"{int(stat.st_mtime):x}-{stat.st_size:x}"'
    status, headers, _ = https_get(nginx, tls, "/static/admin/css/base.css")
    assert (status, headers["content-type"]) == (200, "text/css")
    status, _, body = https_get(nginx, tls, "/static/no-such-file.js")
    assert (status, body) == (404, NGINX_404)


# --- the other deploy files --------------------------------------------------------

ENV_EXAMPLE = DEPLOY / "chatsite.env.example"
UNIT = DEPLOY / "chatsite@.service"


def env_file(text, *, uncomment=False):
    """The VARIABLE=value lines of an EnvironmentFile; ``#VARIABLE=`` ones too."""
    values = {}
    for line in text.splitlines():
        if uncomment and re.fullmatch(r"#[A-Z][A-Z0-9_]*=.*", line):
            line = line[1:]
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def settings_with(environment):
    """repr() of every setting of chatsite.settings loaded with ``environment``."""
    code = (
        "import json, chatsite.settings as s; "
        "print(json.dumps({k: repr(getattr(s, k)) for k in dir(s) if k.isupper()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_env_example_lists_every_chat_setting_with_its_default():
    text = ENV_EXAMPLE.read_text()
    source = (ROOT / "chatsite" / "settings.py").read_text()
    read = set(re.findall(r"env_[a-z]+\(\s*\"(CHAT_[A-Z0-9_]+)\"", source))
    assert "CHAT_HEARTBEAT" in read
    listed = set(env_file(text, uncomment=True))
    assert read - listed == set(), "settings.py reads these, the example lacks them"
    assert env_file(text)["DJANGO_DEBUG"] == "0"
    assert {
        "DATABASE_URL",
        "REDIS_URL",
        "DJANGO_SECRET_KEY",
        "DJANGO_ALLOWED_HOSTS",
    } <= set(env_file(text))
    # Uncommenting every default changes no setting at all.
    assert settings_with(env_file(text, uncomment=True)) == settings_with(
        env_file(text)
    )


def test_the_unit_runs_daphne_of_the_checkout_nginx_serves_static_files_from():
    lines = dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if re.fullmatch(r"[A-Za-z]+=.*", line)
    )
    checkout = lines["WorkingDirectory"]
    assert lines["ExecStart"] == (
        f"{checkout}/.venv/bin/daphne -b 127.0.0.1 -p %i chatsite.asgi:application"
    )
    assert lines["EnvironmentFile"] == "/etc/chatsite/chatsite.env"
    # STATIC_ROOT is BASE_DIR / "staticfiles", BASE_DIR the checkout.
    assert f"alias {checkout}/staticfiles/;" in SITE.read_text()
    upstream = re.findall(r"server (127\.0\.0\.1:\d+) ", SITE.read_text())
    assert upstream == ["127.0.0.1:8001", "127.0.0.1:8002"]
