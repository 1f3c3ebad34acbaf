"""Real server processes for tests: a private redis-server and daphne processes."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from django.db import connection

from tests.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SECRET_KEY = "tests-only-secret-key-not-for-production"


def require_binary(name):
    """The path of ``name``; a missing one fails under CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def database_url():
    """The URL of the test database, for server processes to share it."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = settings.get("USER") or ""
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings['NAME']}"


class RedisServer:
    """A redis-server of the test's own, on a free port; it may stop and restart."""

    def __init__(self):
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="chatsite-redis-")
        self.process = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process)
        return self

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self):
        self.stop()
        return self.start()


class DaphneServer:
    """``daphne chatsite.asgi:application`` in a process of its own."""

    def __init__(
        self,
        *,
        redis_url=None,
        heartbeat=30,
        extra_env=None,
        verbosity=1,
        application="chatsite.asgi:application",
        daphne_args=(),
    ):
        self.port = free_port()
        self.application = application
        self.daphne_args = tuple(daphne_args)  # more of daphne's own options
        # 0 drops the access log (a line per socket) and keeps warnings, errors.
        self.verbosity = verbosity
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            "DJANGO_SECRET_KEY": SECRET_KEY,
            "DJANGO_DEBUG": "0",
            "DJANGO_ALLOWED_HOSTS": "localhost,127.0.0.1",
            "DATABASE_URL": database_url(),
            "CHAT_HEARTBEAT": str(heartbeat),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("REDIS_URL", None)
        if redis_url:
            self.env["REDIS_URL"] = redis_url
        self.env.update(extra_env or {})
        self.log = tempfile.NamedTemporaryFile(
            prefix="chatsite-daphne-", suffix=".log", delete=False
        )
        self.process = None

    @property
    def http_url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self):
        return f"ws://127.0.0.1:{self.port}/ws/"

    def start(self):
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "--verbosity",
                str(self.verbosity),
                *self.daphne_args,
                self.application,
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(self.port, self.process)
        except RuntimeError:
            raise RuntimeError(f"daphne did not start:\n{self.output()}") from None
        return self

    def output(self):
        return Path(self.log.name).read_text(errors="replace")

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def stop(self, sig=signal.SIGTERM):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self):
        self.stop(signal.SIGKILL)


@contextlib.contextmanager
def this_process_uses_redis(redis_url, *, heartbeat=None):
    """Point this (the test) process's channel layer and presence at ``redis_url``.

    Inside, what the test process does through the services (the admin through
    Django's test client, ``chat.push``) reaches the sockets of server processes
    on the same Redis. Server processes are configured through the environment
    (``DaphneServer``); this is the same configuration for the test process.
    """
    from channels.layers import channel_layers
    from django.conf import settings
    from django.test import override_settings

    layers = {
        "default": {
            "BACKEND": "chat.layers.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{"address": redis_url}],
                "prefix": settings.CHAT_REDIS_PREFIX,
                "capacity": 100_000,
                "expiry": 60,
                "group_expiry": 86400,
            },
        }
    }
    overrides = {"REDIS_URL": redis_url, "CHANNEL_LAYERS": layers}
    if heartbeat is not None:
        overrides["CHAT_HEARTBEAT"] = heartbeat
    channel_layers.backends.clear()
    try:
        with override_settings(**overrides):
            yield
    finally:
        channel_layers.backends.clear()


def shadow_distribution(directory, name, version):
    """A directory whose metadata says ``version`` of ``name`` is installed.

    Put first on a server process's ``PYTHONPATH``, it is what
    ``importlib.metadata`` finds for ``name``, while the code imported stays
    the installed one: how a server meets a version it was not written for.
    """
    info = Path(directory) / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    return Path(directory)


def require_postgres_binary(name):
    """The path of PostgreSQL's ``name`` (``initdb``, ``pg_ctl``).

    On ``PATH``, else in the directory ``pg_config --bindir`` names (Debian keeps
    the server's programs off ``PATH``); a missing one fails under CI and skips
    elsewhere, as ``require_binary``.
    """
    if shutil.which(name) is None:
        pg_config = shutil.which("pg_config")
        if pg_config is not None:
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=False
            )
            candidate = Path(found.stdout.strip()) / name
            if found.returncode == 0 and os.access(candidate, os.X_OK):
                return str(candidate)
    return require_binary(name)


class PostgresServer:
    """A PostgreSQL cluster of the test's own, on a free port; it may stop and start.

    ``initdb`` refuses to run as root: then the cluster's directory and programs
    belong to the ``postgres`` system user (``runuser``). Trust authentication on
    127.0.0.1 only; no fsync (a test's data need not survive a crash).
    """

    def __init__(self):
        self.initdb = require_postgres_binary("initdb")
        self.pg_ctl = require_postgres_binary("pg_ctl")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="chatsite-postgres-"))
        self.as_owner = []
        if os.geteuid() == 0:
            import pwd

            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root, initdb needs a 'postgres' system user")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self.as_owner = [require_binary("runuser"), "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.running = False

    def url(self, database="postgres"):
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *command):
        done = subprocess.run(
            [*self.as_owner, *command],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{command[:2]} failed ({done.returncode}):\n{done.stdout}"
                f"{done.stderr}\n{self.output()}"
            )

    def init(self):
        self._run(
            self.initdb,
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        return self

    def start(self):
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        data, log = str(self.data), str(self.log)
        self._run(self.pg_ctl, "-D", data, "-l", log, "-o", options, "-w", "start")
        self.running = True
        return self

    def stop(self, mode="fast"):
        """``pg_ctl stop -m <mode>``: ``fast`` ends every session at once."""
        if self.running:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")
            self.running = False

    def create_database(self, name):
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def output(self):
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def remove(self):
        """Stop the cluster (immediately) and delete its directory."""
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def manage(*args, database_url, timeout=120):
    """Run ``manage.py <args>`` on ``database_url``; return its standard output."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": database_url,
    }
    env.pop("REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed:\n{done.stdout}{done.stderr}")
    return done.stdout
