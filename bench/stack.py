"""The processes a run needs: its own redis-server, database and daphne servers.

Server processes (daphne, redis-server) are pinned to the first core and the
load generator to the others when ``taskset`` is there. Readings of CPU time
and memory come from ``/proc``.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.ports import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SECRET_KEY = "bench-only-secret-key-not-for-production"
BENCH_DATABASE = "chatsite_bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_layout():
    """(server cpus, client cpus), or (None, None) when nothing can be pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return None, None
    return cpus[:1], cpus[1:]


def pinned(command, cpus):
    if not cpus:
        return command
    return ["taskset", "-c", ",".join(map(str, cpus)), *command]


def raise_open_files_limit():
    """Allow as many sockets as the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid):
    """User + system CPU time a process has used so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def run_ns(pid):
    """Nanoseconds a process's threads (the live ones) have run, from schedstat.

    Finer than ``/proc/<pid>/stat`` (clock ticks, 10 ms): what the idle test of
    the storm scenarios reads over its 200 ms windows.
    """
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total


def listen_overflows():
    """Connections dropped on a full accept queue, machine-wide (TcpExt).

    Each is a SYN the client sends again 1, 3, 7, 15, 31 s… later.
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return None


def core_busy_seconds():
    """CPU seconds each core has been busy since boot, from ``/proc/stat``."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
        busy[int(name[3:])] = (
            user + nice + system + irq + softirq + steal
        ) / CLOCK_TICKS
    return busy


def _stat_fields(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()


def postgres_cpu_seconds():
    """CPU time of the local PostgreSQL: its processes, live and exited.

    Backends come and go (one per connection); the postmaster reaps them, so
    its children's times (cutime, cstime) hold the exited ones.
    """
    parents, total = {}, 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm != "postgres":
            continue
        fields = _stat_fields(entry.name)
        if fields is None:
            continue
        parents[int(entry.name)] = int(fields[1])
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    for pid, ppid in parents.items():
        if ppid not in parents:  # the postmaster
            fields = _stat_fields(pid)
            if fields is not None:
                total += (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
    return total


class CoreWatch:
    """How much of the server cores other processes take, tick by tick.

    The servers and redis-server are pinned there, so whatever else keeps those
    cores busy belongs to someone else (another session's tests, say).
    """

    def __init__(self, stack, cores):
        self.stack = stack
        self.cores = cores
        self.shares = []
        self._last = self._reading()

    def _reading(self):
        busy = core_busy_seconds()
        ours = self.stack.server_cpu() + self.stack.redis_cpu()
        if self.stack.postgres:
            # Not pinned, but serving the run: not someone else's.
            ours += postgres_cpu_seconds()
        return time.monotonic(), sum(busy.get(c, 0.0) for c in self.cores), ours

    def tick(self):
        """The share of the cores others used since the last tick."""
        now, busy, ours = self._reading()
        then, busy0, ours0 = self._last
        self._last = (now, busy, ours)
        share = max(0.0, (busy - busy0) - (ours - ours0)) / max(now - then, 1e-3)
        self.shares.append(share)
        return share

    def wait_quiet(self, limit, timeout, tick=0.5):
        """Wait (at most ``timeout``) for a second in which others stay under limit."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while time.monotonic() < deadline and quiet < 2:
            time.sleep(tick)
            quiet = quiet + 1 if self.tick() < limit else 0
        self.shares.clear()
        return quiet >= 2


def rss_kib(pid):
    """Resident memory of a process, in KiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Process:
    """A server process of the run, logging to a file of its own."""

    def __init__(self, name, command, *, env=None, port):
        self.name = name
        self.command = command
        self.env = env
        self.port = port
        self.log_path = Path(
            tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1]
        )
        self.process = None

    @property
    def pid(self):
        return self.process.pid

    def start(self):
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port(self.port, self.process, timeout=30.0)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{self.name} did not start: {exc}\n{self.log()}"
            ) from None
        return self

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def remove_log(self):
        self.log_path.unlink(missing_ok=True)


def logged_errors(text):
    """One line per logged error: a traceback's exception, or an ERROR message."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next(
                (j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")),
                None,
            )
            yield lines[end].strip()[:160] if end is not None else "Traceback"
        elif " ERROR " in line:
            following = lines[i + 1] if i + 1 < len(lines) else ""
            if not following.startswith("Traceback"):  # counted with its traceback
                yield line.partition(" ERROR ")[2].strip()[:160]


def serving_summaries(text):
    """What chat.serving logged at start-up: the path in use and why."""
    return [line for line in text.splitlines() if line.startswith("fast path ")]


def redis_server(cpus):
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    command = [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
        *("--appendonly", "no", "--dir", workdir, "--maxclients", "20000"),
    ]
    process = Process("redis", pinned(command, cpus), port=port)
    process.workdir = workdir
    return process


SERVERS = ("daphne", "uvicorn")


def asgi_server(kind, index, asgi_app, env, cpus, backlog=None):
    """One ASGI server process: daphne, or uvicorn (uvloop, httptools, websockets).

    ``backlog``: the listen queue, when not the server's default (daphne's, from
    Twisted, is 50; uvicorn's 2048).
    """
    port = free_port()
    if kind == "daphne":
        if backlog is None:
            command = [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
        else:
            endpoint = f"tcp:port={port}:interface=127.0.0.1:backlog={backlog}"
            command = [PYTHON, "-m", "daphne", "-e", endpoint]
        command += ["--verbosity", "0", asgi_app]
    else:
        command = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--loop", "uvloop", "--http", "httptools"]
        command += ["--ws", "websockets-sansio", "--log-level", "warning"]
        command += ["--no-access-log", "--lifespan", "off", asgi_app]
        if backlog is not None:
            command[-1:-1] = ["--backlog", str(backlog)]
    return Process(f"{kind}{index}", pinned(command, cpus), env=env, port=port)


class Stack:
    """One redis-server and ``count`` ASGI server processes serving ``asgi_app``."""

    def __init__(
        self, *, asgi_app, env, count, cpus, postgres=False, kind="daphne", backlog=None
    ):
        self.kind = kind
        self.backlog = backlog
        self.asgi_app = asgi_app
        self.postgres = postgres
        self.base_env = env
        self.count = count
        self.cpus = cpus
        self.redis = None
        self.servers = []
        self.terminated = []  # servers a scenario sent SIGTERM on purpose

    @property
    def redis_url(self):
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def start(self):
        self.redis = redis_server(self.cpus).start()
        env = {**self.base_env, "REDIS_URL": self.redis_url}
        self.servers = [
            asgi_server(self.kind, i, self.asgi_app, env, self.cpus, self.backlog)
            for i in range(self.count)
        ]
        for server in self.servers:
            server.start()
        return self

    def stop(self):
        for process in [*self.servers, self.redis]:
            if process is not None:
                process.stop()

    def clean_logs(self, keep):
        """Remove the log files, or keep them (and say where) after trouble."""
        processes = [p for p in [*self.servers, self.redis] if p is not None]
        if self.redis is not None:
            shutil.rmtree(self.redis.workdir, ignore_errors=True)
        if keep:
            return [str(p.log_path) for p in processes]
        for process in processes:
            process.remove_log()
        return []

    def ports(self):
        return [server.port for server in self.servers]

    def server_cpu(self):
        return sum(cpu_seconds(server.pid) for server in self.servers)

    def redis_cpu(self):
        return cpu_seconds(self.redis.pid)

    def busy_ns(self):
        """Run time of the servers and redis-server so far, in ns (schedstat)."""
        pids = [server.pid for server in self.servers] + [self.redis.pid]
        return sum(run_ns(pid) for pid in pids)

    def terminate(self, index):
        """SIGTERM server ``index`` (a deploy); it is not restarted."""
        server = self.servers[index]
        self.terminated.append(server.name)
        server.process.terminate()
        return server

    def server_rss_kib(self):
        return [rss_kib(server.pid) for server in self.servers]

    def redis_rss_kib(self):
        return rss_kib(self.redis.pid)

    def health(self):
        """Dead servers and logged errors: a run reports them, never hides them."""
        dead = [
            s.name
            for s in self.servers
            if not s.alive() and s.name not in self.terminated
        ]
        errors = Counter()
        for server in self.servers:
            errors.update(logged_errors(server.log()))
        serving = set()
        for server in self.servers:
            serving.update(serving_summaries(server.log()))
        return {
            "dead": dead,
            "errors": sum(errors.values()),
            "kinds": [f"{n}× {line}" for line, n in errors.most_common(5)],
            "serving": sorted(serving),
            "terminated": list(self.terminated),
        }

    def settle(self, *, idle_share=0.05, window=0.5, timeout=60.0):
        """Wait until the servers are nearly idle (presence storms, queues)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.server_cpu() + self.redis_cpu()
            time.sleep(window)
            if self.server_cpu() + self.redis_cpu() - before < idle_share * window:
                return True
        return False


BENCH_RATE_LIMIT = "1000000/10"


def chatsite_env(database_url, heartbeat=3600, fast_path=True):
    return {
        **os.environ,
        # Set either way: a CHAT_FAST_PATH exported in the shell must not decide.
        "CHAT_FAST_PATH": "1" if fast_path else "0",
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "DJANGO_DEBUG": "0",
        "DJANGO_ALLOWED_HOSTS": "localhost,127.0.0.1",
        "DATABASE_URL": database_url,
        "CHAT_HEARTBEAT": str(heartbeat),
        # A few bench users send what thousands of people would: the rate limit
        # is on (its round trip per frame is measured) but far above them.
        "CHAT_RATE_LIMIT": BENCH_RATE_LIMIT,
        "PYTHONUNBUFFERED": "1",
    }


def baseline_env(workdir):
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.baseline.settings",
        "DJANGO_SECRET_KEY": SECRET_KEY,
        "BENCH_BASELINE_DB": str(Path(workdir) / "baseline.sqlite3"),
        "PYTHONUNBUFFERED": "1",
    }


def is_postgres(url):
    return urlsplit(url).scheme in {"postgres", "postgresql", "pgsql"}


class Database:
    """The run's own database: a temporary SQLite file or ``chatsite_bench``."""

    def __init__(self, configured_url):
        self.configured_url = configured_url or ""
        self.workdir = tempfile.mkdtemp(prefix="bench-db-")
        self.url = None
        self.keys = []

    @property
    def vendor(self):
        return "postgresql" if is_postgres(self.configured_url) else "sqlite"

    def create(self):
        if self.vendor == "postgresql":
            self.url = self._postgres_recreate()
        else:
            self.url = f"sqlite:///{Path(self.workdir) / 'bench.sqlite3'}"
        self._manage("migrate", "--noinput")
        return self

    def _postgres_admin(self, *statements):
        import psycopg

        parts = urlsplit(self.configured_url)
        admin = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
        with psycopg.connect(admin, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def _postgres_recreate(self):
        self._postgres_admin(
            f"DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)",
            f"CREATE DATABASE {BENCH_DATABASE}",
        )
        parts = urlsplit(self.configured_url)
        return urlunsplit(parts._replace(path=f"/{BENCH_DATABASE}"))

    def drop(self):
        if self.vendor == "postgresql" and self.url is not None:
            self._postgres_admin(
                f"DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)"
            )

    def _manage(self, *args):
        subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=ROOT,
            env=chatsite_env(self.url),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def seed(self, spec):
        """Create users, tokens, rooms and memberships; return the token keys."""
        done = subprocess.run(
            [PYTHON, "-m", "bench.seed"],
            cwd=ROOT,
            env=chatsite_env(self.url),
            input=json.dumps(spec),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"seeding failed:\n{done.stderr}")
        return json.loads(done.stdout)
