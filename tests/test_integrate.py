"""chat as a reusable app: the wheel, its setting defaults, and a fresh project.

The module's fixture builds the wheel from this checkout, installs it with its
``[client]`` extra and their dependencies (at requirements.txt's versions, the
extra's websockets at the dev lock's) into a virtualenv of its own, makes a
project with ``django-admin startproject hostsite``, changes it with the code
blocks of docs/integrate.md, migrates it and serves it with daphne. The project
lives outside this checkout, so the ``chat`` it imports is the installed one; a
socket test chats with the installed ``chat.client.ChatClient``, run by that
virtualenv's Python.
"""

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from chat import conf
from tests.ports import free_port, wait_for_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "integrate.md"
# What the build reads: pyproject.toml, the package, the templates it carries and
# the readme. Copied, so the build leaves nothing (build/, *.egg-info) here.
BUILD_SOURCES = ["pyproject.toml", "chat", "templates", "docs/integrate.md"]
WHEEL = "django_chatsite_chat-0.1.0-py3-none-any.whl"
TEMPLATES_CARRIED = {
    "base.html",
    "_form_fields.html",
    "chat/banned.html",
    "chat/room.html",
    "chat/room_list.html",
    "admin/chat/live_connections.html",
    "admin/chat/room/change_list.html",
    "registration/locked_out.html",
    "registration/login.html",
    "registration/signup.html",
    "registration/signup_paused.html",
}
PASSWORD = "a long enough password 1"


def run(*command, cwd, env=None, timeout=300):
    """Run ``command``; its stdout, or a failure that shows both streams."""
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (command, done.stdout, done.stderr)
    return done.stdout


def clean_environment(**extra):
    """This environment without the settings of chatsite and of this test run."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DJANGO_", "CHAT_", "PYTHON", "VIRTUAL_ENV"))
        and name not in {"REDIS_URL", "DATABASE_URL"}
    }
    return {**env, **extra}


def locked_pins(name):
    """``{package: version}`` of the ``package==version`` lines of ``name``."""
    lines = (ROOT / name).read_text().splitlines()
    return dict(line.split("==") for line in lines if re.match(r"[A-Za-z].*==", line))


def build_wheel(directory):
    """The wheel pip builds from a copy of this checkout, in ``directory``."""
    source = directory / "source"
    for name in BUILD_SOURCES:
        target = source / name
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name,
                target,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, target)
    # No build isolation: this virtualenv's setuptools (the dev lock's) builds it,
    # with no index needed for the build requirements.
    run(
        sys.executable,
        *("-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation"),
        *("--quiet", "-w", str(directory / "dist")),
        cwd=source,
    )
    return directory / "dist" / WHEEL


def doc_block(first_line):
    """The code block of docs/integrate.md whose first line is ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [block for block in blocks if block.startswith(first_line + "\n")]
    assert len(found) == 1, f"docs/integrate.md has no one block {first_line!r}"
    return found[0]


def make_project(directory, venv):
    """``startproject hostsite``, changed as docs/integrate.md says."""
    run(
        str(venv / "bin" / "django-admin"),
        "startproject",
        "hostsite",
        ".",
        cwd=directory,
    )
    package = directory / "hostsite"
    settings_file = package / "settings.py"
    settings_file.write_text(
        settings_file.read_text() + "\n" + doc_block("# settings.py: add at the end")
    )
    (package / "asgi.py").write_text(doc_block("# asgi.py: replace the file"))
    (package / "urls.py").write_text(doc_block("# urls.py: replace the file"))


SETUP = f"""
from django.contrib.auth import get_user_model
from chat import services
user = get_user_model().objects.create_user("alice", password={PASSWORD!r})
services.room_create(slug="plaza", title="Room plaza")
print(user.pk)
"""

STORED = """
import json
from chat import protocol
from chat.models import Message
m = Message.objects.select_related("author").get(room__slug="plaza", seq=1)
print(json.dumps({
    "type": "message", "room": "plaza", "id": m.pk, "seq": m.seq,
    "user": {"id": m.author.pk, "username": m.author.username},
    "body": m.body, "created_at": protocol.timestamp(m.created_at),
    "client_msg_id": m.client_msg_id, "edited_at": None, "deleted": False,
    "mentions": [], "reactions": [], "reply_to": None, "reply_count": 0,
    "attachments": [],
}))
"""


PAGES = f"""
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()  # lets the client's host, testserver, in
signed_in = Client()
assert signed_in.login(username="alice", password={PASSWORD!r})
for client, path in [
    (signed_in, "/"),
    (signed_in, "/r/plaza/"),
    (Client(), "/accounts/signup/"),
    (Client(), "/accounts/login/"),
]:
    page = client.get(path)
    print(path, page.status_code, [t.name for t in page.templates][:2])
"""


class Host:
    """The fresh project: its virtualenv, directory, user, token and server."""

    def __init__(self, directory):
        self.directory = directory
        self.wheel = build_wheel(directory)
        self.venv = directory / "venv"
        self.project = directory / "project"
        self.project.mkdir()
        self.env = clean_environment(DJANGO_SETTINGS_MODULE="hostsite.settings")
        self.server = None
        self.log = directory / "daphne.log"

    def python(self, *args, timeout=300):
        return run(
            str(self.venv / "bin" / "python"),
            *args,
            cwd=self.project,
            env=self.env,
            timeout=timeout,
        )

    def manage(self, *args):
        return self.python("manage.py", *args)

    def install(self):
        run(sys.executable, "-m", "venv", str(self.venv), cwd=self.directory)
        # The [client] extra's websockets is pinned by the dev lock only.
        self.python(
            *("-m", "pip", "install", "--quiet", f"{self.wheel}[client]"),
            *("-c", str(ROOT / "requirements.txt")),
            *("-c", str(ROOT / "requirements-dev.txt")),
            timeout=900,
        )
        make_project(self.project, self.venv)
        self.manage("migrate", "--noinput")
        self.user_id = int(self.manage("shell", "-c", SETUP).split()[-1])
        self.token = self.manage("chat_token", "alice").split()[-1]

    def start(self):
        self.port = free_port()
        self.server = subprocess.Popen(
            [
                str(self.venv / "bin" / "daphne"),
                *("-b", "127.0.0.1", "-p", str(self.port)),
                "hostsite.asgi:application",
            ],
            cwd=self.project,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
        )
        wait_for_port(self.port, self.server, timeout=60)

    def stop(self):
        if self.server is None or self.server.poll() is not None:
            return
        self.server.send_signal(signal.SIGTERM)
        try:
            self.server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()

    def get(self, path):
        """``(status, headers, body)`` of ``GET path``, redirects not followed."""
        client = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            client.request("GET", path)
            response = client.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            client.close()


@pytest.fixture(scope="module")
def host():
    directory = Path(tempfile.mkdtemp(prefix="chatsite-integrate-"))
    site = Host(directory)
    try:
        site.install()
        site.start()
        yield site
    finally:
        site.stop()
        shutil.rmtree(directory, ignore_errors=True)


# --- the wheel ---------------------------------------------------------------------


def test_the_wheel_holds_chat_its_static_files_and_its_pages_templates(host):
    names = set(zipfile.ZipFile(host.wheel).namelist())
    # Every module of the copy the wheel was built from (this checkout may have
    # changed since).
    source = host.directory / "source"
    modules = {
        path.relative_to(source).as_posix() for path in (source / "chat").rglob("*.py")
    }
    assert {name for name in names if name.endswith(".py")} == modules
    assert {name.split("/")[0] for name in names} == {
        "chat",
        "django_chatsite_chat-0.1.0.dist-info",
    }
    assert {n for n in names if n.startswith("chat/static/")} == {
        "chat/static/chat/chat.css",
        "chat/static/chat/chat.js",
        "chat/static/chat/favicon.svg",
        "chat/static/chat/sidebar.css",
        "chat/static/chat/sidebar.js",
    }
    assert {
        name.removeprefix("chat/templates/")
        for name in names
        if name.startswith("chat/templates/")
    } == TEMPLATES_CARRIED


def test_the_wheel_requires_what_chat_imports_at_the_locked_versions(host):
    metadata = zipfile.ZipFile(host.wheel).read(
        "django_chatsite_chat-0.1.0.dist-info/METADATA"
    )
    required = re.findall(r"^Requires-Dist: ([^;\n]+)", metadata.decode(), re.M)
    pins = locked_pins("requirements.in") | locked_pins("requirements-dev.in")
    imported = [
        "Django",
        "channels",
        "channels-redis",
        "daphne",
        "django-csp",
        "limits",
        "msgspec",
        "prometheus-client",
        "redis",
        "autobahn",
        "twisted",
        "txaio",
    ]
    extras = ["websockets", "prompt_toolkit", "hiredis"]  # [client], [speedups]
    declared = dict(r.strip().split("~=") for r in required)
    assert declared == {name: pins[name] for name in imported + extras}


def test_the_host_imports_the_installed_chat_not_this_checkout(host):
    path = host.python("-c", "import chat; print(chat.__file__)").strip()
    assert path == str(
        host.venv / "lib" / "python3.11" / "site-packages" / "chat" / "__init__.py"
    )


# --- setting defaults --------------------------------------------------------------


def test_the_defaults_are_chatsites_own():
    # chatsite's settings with none of its variables set, in a process of its own.
    script = (
        "import json, chatsite.settings as s; from chat.conf import DEFAULTS; "
        "print(json.dumps({name: getattr(s, name) for name in DEFAULTS}))"
    )
    env = clean_environment(DJANGO_DEBUG="1")
    read = json.loads(run(sys.executable, "-c", script, cwd=ROOT, env=env))
    assert read == conf.DEFAULTS


def test_defaults_fill_only_the_settings_a_project_leaves_out():
    with override_settings(CHAT_HEARTBEAT=7):
        del settings.CHAT_RATE_LIMIT
        del settings.CHAT_ALLOWED_ORIGINS
        conf.apply_defaults()
        assert settings.CHAT_HEARTBEAT == 7
        assert settings.CHAT_RATE_LIMIT == "60/10"
        assert settings.CHAT_ALLOWED_ORIGINS == []
        assert (
            settings.CHAT_ALLOWED_ORIGINS is not conf.DEFAULTS["CHAT_ALLOWED_ORIGINS"]
        )


# --- the fresh project, served by daphne -------------------------------------------


def test_the_room_list_sends_a_visitor_to_sign_in(host):
    status, headers, _ = host.get("/")
    assert (status, headers["Location"]) == (302, "/accounts/login/?next=/")


def test_the_sign_in_page_and_chats_static_files_are_served(host):
    status, _, body = host.get("/accounts/login/")
    assert status == 200
    assert b'<input type="password" name="password"' in body
    assert b'href="/static/chat/chat.css"' in body
    status, _, body = host.get("/static/chat/chat.css")
    assert (status, body) == (200, (ROOT / "chat/static/chat/chat.css").read_bytes())


def test_chats_pages_render_for_a_signed_in_user_from_the_wheels_templates(host):
    lines = host.manage("shell", "-c", PAGES).splitlines()[-4:]
    assert lines == [
        "/ 200 ['chat/room_list.html', 'base.html']",
        "/r/plaza/ 200 ['chat/room.html', 'base.html']",
        "/accounts/signup/ 200 ['registration/signup.html', 'base.html']",
        "/accounts/login/ 200 ['registration/login.html', 'base.html']",
    ]


# Run by the host's virtualenv: over one socket of the installed ChatClient
# (read in order), hello, join plaza, send; the frames received, in order.
EXCHANGE = """
import asyncio, json, sys
import chat.client
from chat.client import ChatClient

async def exchange(url, token):
    client = ChatClient(url, token=token, ordered=True, reconnect=False)
    await client.connect()
    try:
        await client.send({"type": "join", "room": "plaza", "ref": "j1"})
        joined = await client.next_frame(30)
        await client.send({
            "type": "send", "room": "plaza", "body": "hi from a host project",
            "client_msg_id": "c-1", "ref": "s1",
        })
        # The ack and the sender's own message, in either order.
        own = [await client.next_frame(30), await client.next_frame(30)]
    finally:
        await client.close()
    return client.hello, joined, own

hello, joined, own = asyncio.run(exchange(*sys.argv[1:]))
print(json.dumps({
    "client": chat.client.__file__, "hello": hello, "joined": joined, "own": own,
}))
"""


def test_a_token_socket_gets_hello_joins_and_sends(host):
    url = f"ws://127.0.0.1:{host.port}/ws/"
    done = json.loads(host.python("-c", EXCHANGE, url, host.token).splitlines()[-1])
    hello, joined, own = done["hello"], done["joined"], done["own"]
    # The [client] extra's ChatClient, installed from the wheel.
    assert done["client"] == str(
        host.venv / "lib" / "python3.11" / "site-packages" / "chat" / "client.py"
    )

    assert re.fullmatch(r"[0-9a-f]{8}-[0-9]+", hello.get("connection_id", ""))
    assert hello == {
        "type": "hello",
        "protocol": 1,
        "connection_id": hello["connection_id"],
        "user": {"id": host.user_id, "username": "alice"},
        "heartbeat": 30,
    }
    assert joined == {
        "type": "joined",
        "ref": "j1",
        "room": "plaza",
        "title": "Room plaza",
        "last_seq": 0,
        "online": ["alice"],
        "online_count": 1,
        "read_seq": 0,
        "unread": 0,
        "mentions": 0,
        "private": False,
        "direct": False,
        "closed": False,
    }
    message = json.loads(host.manage("shell", "-c", STORED).splitlines()[-1])
    assert message["body"] == "hi from a host project"
    assert message["user"] == {"id": host.user_id, "username": "alice"}
    ack = {
        "type": "ack",
        "ref": "s1",
        "room": "plaza",
        "client_msg_id": "c-1",
        "id": message["id"],
        "seq": 1,
    }
    assert sorted(own, key=str) == sorted([ack, message], key=str)


def test_daphne_stops_cleanly_having_logged_no_error(host):
    host.stop()
    errors = host.log.read_text()
    assert host.server.returncode == 0, errors
    assert "Traceback" not in errors
