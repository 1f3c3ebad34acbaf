"""The scenarios, driven from the harness process.

A ``Session`` is one scenario's servers (a fresh redis-server and daphne
processes) and client processes. It connects sockets round-robin over the
servers and the client processes, runs steps and turns what the clients
counted into figures: deliveries/s, latency percentiles, loss, CPU.
"""

import math
import multiprocessing
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen, profile
from bench.stack import (
    CoreWatch,
    Stack,
    core_busy_seconds,
    cpu_seconds,
    listen_overflows,
    postgres_cpu_seconds,
)

FANOUT_SENDERS = 4
# At low rates a step lasts longer, so its p99 is not one message's worst case.
FANOUT_MIN_MESSAGES = 30
ROOMS = 250
ROOM_MEMBERS = 4
IDLE_PER_ROOM = 4
IDLE_WARM_SOCKETS = 100
PERSIST_SENDERS = 10
PERSIST_WINDOW = 20
P99_LIMIT_MS = 100.0
CLIENT_SATURATED = 0.9
LATE_SHARE = 0.05
# A step waits (up to QUIET_WAIT seconds) until other processes leave the server
# core alone. Others busier than NOISY_SHARE of it over the step, or than
# NOISY_PEAK in any half second, make the step "noisy"; a failing noisy fan-out
# step is run again.
NOISY_SHARE = 0.10
NOISY_PEAK = 0.50
QUIET_WAIT = 30.0
NOISY_RETRIES = 2
MAX_DELIVERIES_PER_SECOND = 256_000
REFINE_STEPS = 2  # fan-out: bisection steps after the first failing doubling
CONNECT_CONCURRENCY = 64
# Fan-out: the target for the server CPU per delivery at the held rate.
FANOUT_TARGET_US_PER_DELIVERY = 10.0
# Storms. The servers are idle again at the first IDLE_WINDOW (after the last
# joined, or the last recovered) that starts IDLE_QUIET seconds of windows in
# each of which the daphne processes and redis-server together ran less than
# IDLE_SHARE of one core (schedstat, ns). Presence batches go out once a second
# at most, so a quiet second cannot fall between two of them.
IDLE_WINDOW = 0.2
IDLE_SHARE = 0.05
IDLE_QUIET = 1.0
CALM_TIMEOUT = 60.0
JOINSTORM_ROOM = "jstorm"
JOINSTORM_TARGET_S = 2.0  # the issue: idle again within 2 s of the storm's start
JOINSTORM_TARGET_CPU_S = 2.0  # and at most 2 CPU-seconds of the daphne processes
RECONNECT_BIG_ROOM = "rbig"
RECONNECT_SMALL_USERS = 4  # users per small room
RECONNECT_SOCKETS_PER_USER = 4  # sockets per user in the small rooms
RECONNECT_BIG_SENDERS = 4
RECONNECT_SMALL_SENDER_EVERY = 10  # one sender in every 10th small room
RECONNECT_RATE = 1.0  # msgs/s per sender
RECONNECT_KILLED = 0  # the server that gets SIGTERM
RECONNECT_TARGET_S = 10.0
RECONNECT_TIMEOUT = 90.0


@dataclass
class Durations:
    """How long a run measures: the full run, or ``--quick`` for a smoke run."""

    fanout_start: int  # deliveries/s of the first fan-out step
    fanout_step: float
    rooms: float
    persist: float
    idle_sockets: int
    refine: bool
    storm_sockets: int  # join storm: sockets joining one room
    reconnect_big: int  # reconnect storm: sockets (one per user) in the big room
    reconnect_rooms: int  # reconnect storm: small rooms of 4 users × 4 sockets
    reconnect_lead: float  # seconds of steady sending before the SIGTERM

    @classmethod
    def for_run(cls, quick):
        if quick:
            return cls(
                fanout_start=1000,
                fanout_step=2.0,
                rooms=5.0,
                persist=3.0,
                idle_sockets=1000,
                refine=False,
                storm_sockets=250,
                reconnect_big=250,
                reconnect_rooms=50,
                reconnect_lead=2.0,
            )
        return cls(
            fanout_start=250,
            fanout_step=6.0,
            rooms=20.0,
            persist=10.0,
            idle_sockets=5000,
            refine=True,
            storm_sockets=1000,
            reconnect_big=1000,
            reconnect_rooms=250,
            reconnect_lead=3.0,
        )


@dataclass
class Target:
    """What is benchmarked: chatsite, or the tutorial's consumer (baseline)."""

    name: str
    asgi_app: str
    env: dict
    keys: list = field(default_factory=list)
    postgres: bool = False

    @property
    def acknowledges(self):
        return self.name == "chatsite"

    def socket(self, port, user, room, sender):
        if self.name == "chatsite":
            url = f"ws://127.0.0.1:{port}/ws/?token={self.keys[user]}"
            return {"url": url, "room": room, "sender": sender}
        return {
            "url": f"ws://127.0.0.1:{port}/ws/chat/{room}/",
            # The tutorial's AllowedHostsOriginValidator refuses a missing Origin.
            "headers": {"Origin": "http://127.0.0.1"},
            "room": room,
            "sender": sender,
        }


def percentile(ordered, q):
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value_us):
    return None if value_us is None else round(value_us / 1000, 2)


class Clients:
    """The client processes, pinned to the load generator's cores."""

    def __init__(self, kind, count, cpus):
        context = multiprocessing.get_context("spawn")
        self.cpus = cpus
        self.pipes = []
        self.processes = []
        for index in range(count):
            parent, child = context.Pipe()
            process = context.Process(
                target=loadgen.worker_main,
                args=(child, index, kind, cpus),
                daemon=True,
            )
            process.start()
            self.pipes.append(parent)
            self.processes.append(process)

    def __len__(self):
        return len(self.pipes)

    def send(self, commands):
        for pipe, command in zip(self.pipes, commands, strict=True):
            pipe.send(command)

    def receive(self):
        return [pipe.recv() for pipe in self.pipes]

    def call(self, commands):
        self.send(commands)
        return self.receive()

    def call_all(self, **command):
        return self.call([dict(command) for _ in self.pipes])

    def close(self):
        try:
            self.call_all(op="close")
        except (EOFError, OSError):
            pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


class Session:
    """One scenario's servers and clients."""

    def __init__(self, name, target, options, layout):
        self.name = name
        self.target = target
        self.options = options
        self.server_cpus, self.client_cpus = layout
        self.stack = Stack(
            asgi_app=target.asgi_app,
            env=target.env,
            count=options.servers,
            cpus=self.server_cpus,
            postgres=target.postgres,
            kind=options.server,
            backlog=options.backlog,
        )
        self.clients = None
        self.members = {}  # room -> connected sockets
        self.socket_count = 0
        self.steps = 0

    def __enter__(self):
        self.stack.start()
        self.clients = Clients(self.target.name, self.options.clients, self.client_cpus)
        return self

    def __exit__(self, *exc):
        self.health = self.stack.health()
        if self.clients is not None:
            # Every socket closes at once: how the servers take that is reported
            # apart from what happened while measuring.
            self.clients.close()
            self.stack.settle(timeout=15)
            after = self.stack.health()
            self.health["teardown_errors"] = after["errors"] - self.health["errors"]
            self.health["teardown_kinds"] = after["kinds"]
        self.stack.stop()
        kept = self.stack.clean_logs(keep=self._troubled())
        for path in kept:
            log(f"kept the log of a troubled run: {path}")
        # File names only: the results are committed, the machine's paths are not.
        self.health["logs"] = [Path(path).name for path in kept]

    def _troubled(self):
        health = self.health
        return bool(health["dead"] or health["errors"] or health.get("teardown_errors"))

    @property
    def client_cores(self):
        return len(self.client_cpus) if self.client_cpus else 1

    def connect(self, sockets, profile_label=None):
        """Open ``(room, user, sender)`` sockets; each is joined to its room.

        Socket i goes to server i mod N, and the client processes take turns.
        """
        ports = self.stack.ports()
        per_client = [[] for _ in range(len(self.clients))]
        for room, user, sender in sockets:
            i = self.socket_count
            self.socket_count += 1
            spec = self.target.socket(ports[i % len(ports)], user, room, sender)
            per_client[(i // len(ports)) % len(self.clients)].append(spec)
        recording = self.profile(profile_label) if profile_label else None
        server_cpu = self.stack.server_cpu()
        wall = time.monotonic()
        results = self.clients.call(
            [
                {"op": "connect", "sockets": specs, "concurrency": CONNECT_CONCURRENCY}
                for specs in per_client
            ]
        )
        seconds = time.monotonic() - wall
        server_cpu = self.stack.server_cpu() - server_cpu
        samples = recording.finish() if recording else None
        connected = sum(r["connected"] for r in results)
        # A room's expected deliveries count the sockets that did join it.
        for result in results:
            for room, count in result["rooms"].items():
                self.members[room] = self.members.get(room, 0) + count
        failures = [f for r in results for f in r["failures"]]
        extra = {"profile": samples} if samples else {}
        return {
            **extra,
            "sockets": len(sockets),
            "connected": connected,
            "failed": sum(r["failed"] for r in results),
            "failures": failures[:3],
            "seconds": round(seconds, 2),
            "per_second": round(connected / seconds, 1) if seconds else None,
            "server_cpu_share": round(server_cpu / max(seconds, 1e-9), 3),
            "server_ms_per_socket": round(server_cpu / max(connected, 1) * 1e3, 2),
            "client_cpu_share": round(
                max(r["cpu"] / max(r["seconds"], 1e-9) for r in results), 3
            ),
        }

    def member_specs(self, sockets, failover=None):
        """Per client process, the specs of ``(room, user, sender)`` Members.

        Placed as ``connect`` places sockets; ``failover(i)`` is the index of the
        server socket i reconnects to (its own server when not given).
        """
        ports = self.stack.ports()
        per_client = [[] for _ in range(len(self.clients))]
        for room, user, sender in sockets:
            i = self.socket_count
            self.socket_count += 1
            server = i % len(ports)
            spec = self.target.socket(ports[server], user, room, sender)
            other = server if failover is None else failover(i)
            spec["failover"] = self.target.socket(ports[other], user, room, sender)[
                "url"
            ]
            spec["server"] = server
            per_client[(i // len(ports)) % len(self.clients)].append(spec)
        return per_client

    def settle(self, timeout=60.0):
        return self.stack.settle(timeout=timeout)

    def step(self, *, mode, duration, rate=0.0, window=0, label=""):
        """Run one measured step on every client process; return its figures."""
        self.steps += 1
        step = self.steps
        # What is not acknowledged or delivered this long after the step counts
        # as unacknowledged or lost.
        drain = min(10.0, max(3.0, duration))
        watch = CoreWatch(self.stack, self.server_cpus) if self.server_cpus else None
        waited = time.monotonic()
        if watch is not None:
            watch.wait_quiet(NOISY_SHARE, QUIET_WAIT)
        waited = time.monotonic() - waited
        start = time.monotonic() + 0.3
        command = {
            "op": "run",
            "step": step,
            "tag": f"{label}{step}",
            "start": start,
            "duration": duration,
            "mode": mode,
            "rate": rate,
            "window": window,
            "drain": drain,
        }
        count = len(self.clients)
        self.clients.send([{**command, "phase": i / count} for i in range(count)])
        time.sleep(max(0.0, start - time.monotonic()))
        server0, redis0 = self.stack.server_cpu(), self.stack.redis_cpu()
        postgres0 = postgres_cpu_seconds() if self.stack.postgres else None
        cores0 = core_busy_seconds()
        recording = self.profile(f"step{step}")
        if watch is not None:
            watch.tick()
            watch.shares.clear()
        while (left := start + duration - time.monotonic()) > 0:
            time.sleep(min(0.5, left))
            if watch is not None:
                watch.tick()
        server_cpu = self.stack.server_cpu() - server0
        redis_cpu = self.stack.redis_cpu() - redis0
        cores = {c: t - cores0.get(c, 0.0) for c, t in core_busy_seconds().items()}
        if postgres0 is not None:
            postgres_cpu = postgres_cpu_seconds() - postgres0
            redis_cpu_and_db = redis_cpu + postgres_cpu
        else:
            postgres_cpu, redis_cpu_and_db = None, redis_cpu
        samples = recording.finish() if recording else None
        runs = self.clients.receive()
        expected = self._expected(runs)
        self._drain(step, expected, timeout=drain)
        collected = self.clients.call_all(op="collect", step=step)
        figures = self._figures(
            runs, collected, expected, duration, server_cpu, redis_cpu, rate, mode
        )
        figures.update(
            self._machine(cores, runs, server_cpu + redis_cpu_and_db, duration)
        )
        if postgres_cpu is not None:
            figures["postgres_cpu_share"] = round(postgres_cpu / duration, 3)
        figures.update(noise(watch, waited))
        if samples:
            figures["profile"] = samples
        return figures

    def _machine(self, cores, runs, ours, duration):
        """How busy each core was, and how much of it was not this benchmark.

        Other sessions' test suites may share the machine; their CPU shows here
        (and so does PostgreSQL's, which runs on any core).
        """
        clients = sum(r["cpu"] for r in runs)
        other = max(0.0, sum(cores.values()) - ours - clients) / duration
        return {
            "core_busy_share": {
                c: round(t / duration, 3) for c, t in sorted(cores.items())
            },
            "other_cpu_share": round(other, 3),
        }

    def profile(self, label):
        """Start sampling the first server with py-spy, if ``--profile`` asked."""
        if self.options.profile is None:
            return None
        name = f"{self.target.name}-{self.name}-{label}.txt"
        return profile.Recording(self.stack.servers[0].pid, self.options.profile / name)

    def _expected(self, runs):
        acked = {}
        for run in runs:
            for room, count in run["acked"].items():
                acked[room] = acked.get(room, 0) + count
        return sum(count * self.members[room] for room, count in acked.items())

    def _drain(self, step, expected, timeout, quiet=1.5):
        """Wait until every expected delivery arrived or nothing moves any more."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            received = sum(
                r["received"] for r in self.clients.call_all(op="count", step=step)
            )
            if received >= expected:
                return
            if received != last:
                last, last_change = received, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                return
            time.sleep(0.1)

    def _figures(
        self, runs, collected, expected, duration, server_cpu, redis_cpu, rate, mode
    ):
        latencies = array("q")
        ack_latencies = array("q")
        for c in collected:
            latencies.frombytes(c["latencies"])
            ack_latencies.frombytes(c["ack_latencies"])
        latencies = sorted(latencies)
        ack_latencies = sorted(ack_latencies)
        delivered = len(latencies)
        sent = sum(sum(r["sent"].values()) for r in runs)
        acked = sum(sum(r["acked"].values()) for r in runs)
        client_shares = [r["cpu"] / max(r["wall"], 1e-9) for r in runs]
        client_total = sum(r["cpu"] for r in runs) / max(duration, 1e-9)
        late_sends = sum(r["late_sends"] for r in runs)
        saturated = max(client_shares) > CLIENT_SATURATED or (
            client_total > CLIENT_SATURATED * self.client_cores
        )
        # Sends far behind their schedule mean the offered rate was not offered.
        behind = mode == "rate" and late_sends > LATE_SHARE * max(sent, 1)
        errors = {}
        for c in collected:
            for code, count in c["errors"].items():
                errors[code] = errors.get(code, 0) + count
        p99 = ms(percentile(latencies, 0.99))
        lost = max(0, expected - delivered)
        unacked = sum(r["unacked"] for r in runs) if self.target.acknowledges else 0
        dropped = sum(c["dropped"] for c in collected)
        return {
            "mode": mode,
            "offered_msgs_per_s": rate,
            "seconds": duration,
            "sent": sent,
            "acked": acked,
            "unacked": unacked,
            "acked_per_s": round(sum(r["acked_in_window"] for r in runs) / duration, 1),
            "expected_deliveries": expected,
            "delivered": delivered,
            "lost": lost,
            "extra": max(0, delivered - expected),
            "deliveries_per_s": round(delivered / duration, 1),
            "p50_ms": ms(percentile(latencies, 0.50)),
            "p99_ms": p99,
            "max_ms": ms(latencies[-1] if latencies else None),
            "ack_p50_ms": ms(percentile(ack_latencies, 0.50)),
            "ack_p99_ms": ms(percentile(ack_latencies, 0.99)),
            "server_cpu_share": round(server_cpu / duration, 3),
            "redis_cpu_share": round(redis_cpu / duration, 3),
            "server_us_per_delivery": (
                round(server_cpu / delivered * 1e6, 1) if delivered else None
            ),
            "client_cpu_share": round(max(client_shares), 3),
            "client_cpu_total": round(client_total, 3),
            "late_sends": late_sends,
            "max_send_lateness_ms": round(max(r["max_lateness_ms"] for r in runs), 1),
            "client_limited": saturated or behind,
            "dropped_sockets": dropped,
            "error_frames": errors,
            "passed": (
                p99 is not None
                and p99 < P99_LIMIT_MS
                and lost == 0
                and unacked == 0
                and dropped == 0
            ),
        }


def noise(watch, waited):
    """Figures on how much other processes disturbed a step."""
    if watch is None or not watch.shares:
        return {"noisy": False}
    mean = sum(watch.shares) / len(watch.shares)
    peak = max(watch.shares)
    return {
        "other_on_server_cores": round(mean, 3),
        "other_on_server_cores_peak": round(peak, 3),
        "waited_for_quiet_s": round(waited, 1),
        "noisy": mean > NOISY_SHARE or peak > NOISY_PEAK,
    }


def log(message):
    print(message, flush=True, file=sys.stderr)


def step_line(name, figures):
    return (
        f"  {name}: offered {figures['offered_msgs_per_s']:g} msg/s, "
        f"{figures['deliveries_per_s']:,.0f} deliveries/s, "
        f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
        f"lost {figures['lost']}, unacked {figures['unacked']}, "
        f"server cpu {figures['server_cpu_share']:.0%} "
        f"({figures['server_us_per_delivery']} µs/delivery), "
        f"client cpu {figures['client_cpu_share']:.0%}, "
        f"others on server core {figures.get('other_on_server_cores', 0):.0%}"
        f"{' NOISY' if figures['noisy'] else ''}"
        f"{' CLIENT-LIMITED' if figures['client_limited'] else ''}"
        f" -> {'pass' if figures['passed'] else 'FAIL'}"
    )


def fanout_step_seconds(durations, rate):
    shortest = durations.fanout_step
    return min(3 * shortest, max(shortest, FANOUT_MIN_MESSAGES / rate))


def fanout_step(session, receivers, senders, rate, steps):
    """Offer ``rate`` msgs/s to the room; a noisy failure is run again."""
    for _ in range(1 + NOISY_RETRIES):
        session.settle(timeout=15)
        figures = session.step(
            mode="rate",
            duration=fanout_step_seconds(session.options.durations, rate),
            rate=rate / senders,
            label=f"f{receivers}-",
        )
        figures["offered_msgs_per_s"] = round(rate, 2)
        steps.append(figures)
        log(step_line(f"fan-out {receivers}", figures))
        if figures["passed"] or not figures["noisy"]:
            break
    return figures


def fanout(session, receivers):
    """One room, ``receivers`` members, 4 of them senders, offered rate doubling."""
    room = f"fan{receivers}"
    senders = min(FANOUT_SENDERS, receivers)
    connect = session.connect([(room, i, i < senders) for i in range(receivers)])
    log(f"  connected {connect['connected']}/{receivers} in {connect['seconds']}s")
    session.settle()
    # At least 1 msg/s: a slower step would hold too few messages for a p99.
    rate = max(1.0, session.options.durations.fanout_start / receivers)
    steps, best, failed = [], None, None
    while rate * receivers <= MAX_DELIVERIES_PER_SECOND:
        figures = fanout_step(session, receivers, senders, rate, steps)
        if not figures["passed"]:
            failed = figures
            break
        best = figures
        if figures["client_limited"]:
            break
        rate *= 2
    if session.options.durations.refine and best is not None and failed is not None:
        # Bisect (geometrically) between the last pass and the fail, so the held
        # rate is known within 2^(1/4), about 19 %, not within a doubling.
        low, high = best["offered_msgs_per_s"], failed["offered_msgs_per_s"]
        for _ in range(REFINE_STEPS):
            rate = math.sqrt(low * high)
            figures = fanout_step(session, receivers, senders, rate, steps)
            if figures["passed"]:
                best, low = figures, rate
            else:
                high = rate
    return {
        "receivers": receivers,
        "senders": senders,
        "connect": connect,
        "steps": steps,
        "best": best,
        "first_failure": failed,
        "first_step": steps[0] if steps else None,
        "client_limited": any(s["client_limited"] for s in steps),
        # Daphne CPU-s in the held step's send window / that step's deliveries.
        "held_us_per_delivery": best["server_us_per_delivery"] if best else None,
        "target_us_per_delivery": FANOUT_TARGET_US_PER_DELIVERY,
    }


def rooms(session):
    """250 rooms of 4 members, every member sending 1 msg/s."""
    sockets = [
        (f"r{k:03d}", k * ROOM_MEMBERS + m, True)
        for k in range(ROOMS)
        for m in range(ROOM_MEMBERS)
    ]
    connect = session.connect(sockets)
    log(f"  connected {connect['connected']}/{len(sockets)} in {connect['seconds']}s")
    session.settle()
    figures = session.step(
        mode="rate", duration=session.options.durations.rooms, rate=1.0, label="r"
    )
    log(step_line("many rooms", figures))
    return {
        "rooms": ROOMS,
        "members": ROOM_MEMBERS,
        "acknowledged": session.target.acknowledges,
        "connect": connect,
        **figures,
    }


def idle(session):
    """Idle sockets, each joined to a room of 4: memory per socket, connect rate."""
    count = session.options.durations.idle_sockets
    sockets = [(f"idle{i // IDLE_PER_ROOM:04d}", i, False) for i in range(count)]
    warm, rest = sockets[:IDLE_WARM_SOCKETS], sockets[IDLE_WARM_SOCKETS:]
    # The first sockets pay for imports, pools and caches; measure after them.
    session.connect(warm)
    session.settle()
    rss_before = session.stack.server_rss_kib()
    redis_before = session.stack.redis_rss_kib()
    connect = session.connect(rest, profile_label="connect")
    log(f"  connected {connect['connected']}/{len(rest)} in {connect['seconds']}s")
    session.settle()
    time.sleep(1.0)
    rss_after = session.stack.server_rss_kib()
    redis_after = session.stack.redis_rss_kib()
    measured = max(connect["connected"], 1)
    return {
        "sockets": count,
        "measured_sockets": len(rest),
        "connect": connect,
        "connects_per_s": connect["per_second"],
        "server_rss_kib_before": rss_before,
        "server_rss_kib_after": rss_after,
        "kib_per_socket": round((sum(rss_after) - sum(rss_before)) / measured, 2),
        "redis_kib_per_socket": round((redis_after - redis_before) / measured, 2),
        "client_cpu_share": connect["client_cpu_share"],
        "client_limited": connect["client_cpu_share"] > CLIENT_SATURATED,
    }


def persist(session):
    """One busy room: 10 senders, each keeping 20 sends unacknowledged."""
    if not session.target.acknowledges:
        return {
            "skipped": "the tutorial consumer stores nothing and acknowledges nothing"
        }
    sockets = [("persist", i, True) for i in range(PERSIST_SENDERS)]
    connect = session.connect(sockets)
    session.settle()
    figures = session.step(
        mode="window",
        duration=session.options.durations.persist,
        window=PERSIST_WINDOW,
        label="p",
    )
    log(
        f"  persist: {figures['acked_per_s']:,.0f} acked msgs/s, ack p50 "
        f"{figures['ack_p50_ms']} ms, p99 {figures['ack_p99_ms']} ms, lost "
        f"{figures['lost']}, server cpu {figures['server_cpu_share']:.0%}"
    )
    return {
        "senders": PERSIST_SENDERS,
        "window": PERSIST_WINDOW,
        "connect": connect,
        **figures,
    }


class Calm:
    """Server CPU sampled every IDLE_WINDOW, to tell when a storm has calmed.

    Each sample is (monotonic s, daphne CPU-s, redis CPU-s, daphne + redis run
    ns): the CPU-seconds come from ``/proc/<pid>/stat`` (utime + stime), the
    idle test from schedstat, which is finer than the stat file's 10 ms ticks.
    """

    def __init__(self, stack):
        self.stack = stack
        self.samples = []
        self.sample()

    def sample(self):
        stack = self.stack
        self.samples.append(
            (time.monotonic(), stack.server_cpu(), stack.redis_cpu(), stack.busy_ns())
        )

    def tick(self):
        """Sleep until the next window boundary, then sample."""
        time.sleep(max(0.0, self.samples[-1][0] + IDLE_WINDOW - time.monotonic()))
        self.sample()

    def replies(self, clients):
        """Sample while waiting for every client process to answer."""
        answers = [None] * len(clients.pipes)
        while any(a is None for a in answers):
            for i, pipe in enumerate(clients.pipes):
                if answers[i] is None and pipe.poll():
                    answers[i] = pipe.recv()
            if any(a is None for a in answers):
                self.tick()
        return answers

    def quiet(self, j):
        (t0, _, _, busy0), (t1, _, _, busy1) = self.samples[j], self.samples[j + 1]
        return (busy1 - busy0) / 1e9 < IDLE_SHARE * (t1 - t0)

    def until_idle(self, after, timeout=CALM_TIMEOUT):
        """The first sample at or after ``after`` that starts a quiet stretch.

        Returns its index, or None when the servers were not idle by
        ``after + timeout``.
        """
        need = round(IDLE_QUIET / IDLE_WINDOW)
        j = 0
        while True:
            while j < len(self.samples) and self.samples[j][0] < after:
                j += 1
            while j + need < len(self.samples):
                if all(self.quiet(k) for k in range(j, j + need)):
                    return j
                j += 1
            if time.monotonic() > after + timeout:
                return None
            self.tick()

    def since(self, start, end):
        """(daphne CPU-s, redis CPU-s) between sample indices."""
        a, b = self.samples[start], self.samples[end]
        return b[1] - a[1], b[2] - a[2]

    def shares(self, start, end):
        """Each window's share of one core (daphne + redis), rounded."""
        out = []
        for k in range(start, min(end, len(self.samples) - 1)):
            (t0, _, _, b0), (t1, _, _, b1) = self.samples[k], self.samples[k + 1]
            out.append(round((b1 - b0) / 1e9 / max(t1 - t0, 1e-9), 3))
        return out


def unpack_us(blobs):
    values = array("q")
    for blob in blobs:
        values.frombytes(blob)
    return sorted(values)


def calm_figures(calm, start, ready_at, idle):
    """Seconds and CPU-seconds from sample ``start`` until idle (sample ``idle``)."""
    t_start = calm.samples[start][0]
    if idle is None:
        last = len(calm.samples) - 1
        daphne, redis = calm.since(start, last)
        return {
            "idle": False,
            "idle_after_s": None,
            "calm_s": None,
            "server_cpu_s": round(daphne, 2),
            "redis_cpu_s": round(redis, 2),
            "cpu_measured_for_s": round(calm.samples[last][0] - t_start, 2),
        }
    t_idle = calm.samples[idle][0]
    daphne, redis = calm.since(start, idle)
    # The windows from the last joined (or recovered) to the idle point.
    first = next(k for k, x in enumerate(calm.samples) if x[0] >= ready_at)
    return {
        "idle": True,
        "idle_after_s": round(t_idle - t_start, 2),
        "calm_s": round(max(0.0, t_idle - ready_at), 2),
        "server_cpu_s": round(daphne, 2),
        "redis_cpu_s": round(redis, 2),
        "calm_window_shares": calm.shares(
            first, idle + round(IDLE_QUIET / IDLE_WINDOW)
        ),
    }


def joinstorm(session):
    """1,000 sockets connect and join one room at once; time it until idle."""
    if not session.target.acknowledges:
        return {"skipped": "the tutorial consumer has no join, presence or since"}
    count = session.options.durations.storm_sockets
    specs = session.member_specs([(JOINSTORM_ROOM, i, False) for i in range(count)])
    session.settle()
    overflows = listen_overflows()
    calm = Calm(session.stack)
    began = calm.samples[0][0]
    recording = session.profile("joinstorm")
    # As fast as the load generator can: every socket of a process at once.
    session.clients.send(
        [
            {"op": "storm_connect", "sockets": s, "concurrency": max(1, len(s))}
            for s in specs
        ]
    )
    results = calm.replies(session.clients)
    overflows = overflow_delta(overflows)
    # The storm ends at the last joined; sockets that failed (after the
    # handshake timeout, 60 s) are counted apart.
    ended_at = max(r["end_ns"] for r in results) / 1e9
    joined_at = max(r["last_joined_ns"] for r in results) / 1e9 or ended_at
    failed_by = ended_at - calm.samples[0][0]
    idle = calm.until_idle(joined_at)
    samples = recording.finish() if recording else None
    presence = session.clients.call_all(op="storm_presence")
    connected = sum(r["connected"] for r in results)
    storm_s = joined_at - began
    joins = unpack_us(r["join_us"] for r in results)
    figures = calm_figures(calm, 0, joined_at, idle)
    totals = {
        key: sum(p[key] for p in presence)
        for key in ("presence", "presence_names", "presence_batch")
    }
    totals["presence_batch_names"] = sum(p["presence_batch_names"] for p in presence)
    last_presence = max(p["last_presence_ns"] for p in presence) / 1e9
    errors = Counter()
    for p in presence:
        errors.update(p["errors"])
    result = {
        **({"profile": samples} if samples else {}),
        "sockets": count,
        "connected": connected,
        "failed": sum(r["failed"] for r in results),
        "failures": [f for r in results for f in r["failures"]][:3],
        "storm_s": round(storm_s, 2),
        "all_done_s": round(failed_by, 2),
        "connects_per_s": round(connected / storm_s, 1) if storm_s else None,
        "join_p50_ms": ms(percentile(joins, 0.5)),
        "join_p99_ms": ms(percentile(joins, 0.99)),
        "listen_overflows": overflows,
        "backlog": session.options.backlog,
        **figures,
        **totals,
        "presence_frames_per_socket": round(
            (totals["presence"] + totals["presence_batch"]) / max(connected, 1), 1
        ),
        "last_presence_after_s": (
            round(last_presence - began, 2) if last_presence else None
        ),
        "error_frames": dict(errors),
        "client_cpu_share": round(
            max(r["cpu"] for r in results) / max(storm_s, 1e-9), 3
        ),
        "target_idle_s": JOINSTORM_TARGET_S,
        "target_server_cpu_s": JOINSTORM_TARGET_CPU_S,
        "idle_definition": (
            f"daphne + redis-server under {IDLE_SHARE:.0%} of one core in every "
            f"{IDLE_WINDOW * 1000:.0f} ms window for {IDLE_QUIET:g} s, "
            "from the last joined on"
        ),
    }
    result["met_idle_target"] = bool(
        figures["idle"] and figures["idle_after_s"] <= JOINSTORM_TARGET_S
    )
    result["met_cpu_target"] = figures["server_cpu_s"] <= JOINSTORM_TARGET_CPU_S
    log(
        f"  join storm: {connected}/{count} joined in {storm_s:.2f}s "
        f"({result['connects_per_s']}/s), idle after {figures['idle_after_s']}s "
        f"(calming {figures['calm_s']}s), server {figures['server_cpu_s']} CPU-s, "
        f"redis {figures['redis_cpu_s']} CPU-s; presence {totals['presence']}, "
        f"batches {totals['presence_batch']} "
        f"({totals['presence_batch_names']} names)"
    )
    return result


def overflow_delta(before):
    after = listen_overflows()
    return None if before is None or after is None else after - before


def reconnect_sockets(durations):
    """The reconnect storm's ``(room, user, sender)`` sockets, in connect order.

    The big room: one socket per user, the first RECONNECT_BIG_SENDERS send.
    The small rooms: 4 users each, every user with 4 sockets; one socket sends
    in every 10th room.
    """
    big = durations.reconnect_big
    sockets = [(RECONNECT_BIG_ROOM, i, i < RECONNECT_BIG_SENDERS) for i in range(big)]
    per_room = RECONNECT_SMALL_USERS * RECONNECT_SOCKETS_PER_USER
    for k in range(durations.reconnect_rooms):
        # Sender sockets alternate between the killed server and the other.
        sender = (k // RECONNECT_SMALL_SENDER_EVERY) % 2
        for n in range(per_room):
            user = big + k * RECONNECT_SMALL_USERS + n // RECONNECT_SOCKETS_PER_USER
            sending = k % RECONNECT_SMALL_SENDER_EVERY == 0 and n == sender
            sockets.append((f"rs{k:03d}", user, sending))
    return sockets


def storm_status(session, acked=None):
    """Every client process's Members, summed."""
    replies = session.clients.call_all(op="storm_status", acked=acked)
    total = {"close_codes": Counter(), "reconnect_failures": Counter()}
    for key in ("members", "live", "lost", "recovered", "attempts", "sent"):
        total[key] = sum(r[key] for r in replies)
    total["unacked"] = sum(r["unacked"] for r in replies)
    total["last_recovered_ns"] = max(r["last_recovered_ns"] for r in replies)
    total["recover_us"] = unpack_us(r["recover_us"] for r in replies)
    union = {}
    for r in replies:
        total["close_codes"].update({str(k): v for k, v in r["close_codes"].items()})
        total["reconnect_failures"].update(r["reconnect_failures"])
        for room, seqs in r["acked"].items():
            union.setdefault(room, set()).update(seqs)
    total["acked"] = {room: sorted(seqs) for room, seqs in union.items()}
    if acked is not None:
        for key in (
            "expected",
            "received",
            "missed",
            "missed_at_or_below_since",
            "missed_down",
            "missed_kept",
            "down",
            "duplicates",
            "incomplete_recoveries",
        ):
            total[key] = sum(r[key] for r in replies)
        total["missed_examples"] = [e for r in replies for e in r["missed_examples"]]
        total["missed_messages"] = sorted(
            {tuple(x) for r in replies for x in r["missed_messages"]}
        )
    return total


def reconnectstorm(session):
    """SIGTERM one of two servers under 5,000 sockets; time the way back."""
    if not session.target.acknowledges:
        return {"skipped": "the tutorial consumer has no acks and no since"}
    servers = len(session.stack.servers)
    if servers < 2:
        return {"skipped": "needs two server processes or more (--servers)"}
    durations = session.options.durations
    sockets = reconnect_sockets(durations)

    # Sockets of the killed server reconnect to the next one; the others to their own.
    survivors = [k for k in range(servers) if k != RECONNECT_KILLED]

    def failover(i):
        if i % servers != RECONNECT_KILLED:
            return i % servers
        return survivors[(i // servers) % len(survivors)]

    specs = session.member_specs(sockets, failover=failover)
    on_killed = sum(
        1
        for per_client in specs
        for spec in per_client
        if spec["server"] == RECONNECT_KILLED
    )
    wall = time.monotonic()
    results = session.clients.call(
        [
            {"op": "storm_connect", "sockets": s, "concurrency": CONNECT_CONCURRENCY}
            for s in specs
        ]
    )
    connect_s = time.monotonic() - wall
    connected = sum(r["connected"] for r in results)
    log(f"  connected {connected}/{len(sockets)} in {connect_s:.1f}s")
    on_killed = sum(r["by_server"].get(RECONNECT_KILLED, 0) for r in results)
    session.settle()
    senders = sum(
        r["senders"]
        for r in session.clients.call_all(op="storm_senders", rate=RECONNECT_RATE)
    )
    time.sleep(durations.reconnect_lead)
    before = storm_status(session)
    others = [s for s in session.stack.servers if s is not killed_server(session)]
    others_cpu = sum(cpu_seconds(s.pid) for s in others)
    overflows = listen_overflows()
    killed = session.stack.terminate(RECONNECT_KILLED)
    kill_at = time.monotonic()
    exited_at = None
    status = before
    while time.monotonic() - kill_at < RECONNECT_TIMEOUT:
        time.sleep(0.2)
        if exited_at is None and not killed.alive():
            exited_at = time.monotonic()
        status = storm_status(session)
        if status["lost"] >= on_killed and status["recovered"] >= status["lost"]:
            break
    all_back = status["lost"] >= on_killed and status["recovered"] >= status["lost"]
    recovered_at = status["last_recovered_ns"] / 1e9
    overflows = overflow_delta(overflows)
    others_cpu = sum(cpu_seconds(s.pid) for s in others) - others_cpu
    # Steady sending goes on a little after the last recovery, then stops.
    time.sleep(durations.reconnect_lead)
    session.clients.call_all(op="storm_senders", rate=0)
    final = drain_storm(session)
    if exited_at is None and not killed.alive():
        exited_at = time.monotonic()
    recover = final["recover_us"]
    acked = sum(len(seqs) for seqs in final["acked"].values())
    result = {
        "sockets": len(sockets),
        "connected": connected,
        "failed": sum(r["failed"] for r in results),
        "failures": [f for r in results for f in r["failures"]][:3],
        "connect_s": round(connect_s, 1),
        "rooms": 1 + durations.reconnect_rooms,
        "big_room_sockets": durations.reconnect_big,
        "small_rooms": durations.reconnect_rooms,
        "senders": senders,
        "rate_per_sender": RECONNECT_RATE,
        "on_killed_server": on_killed,
        "killed_server": killed.name,
        "killed_exited_after_s": (
            round(exited_at - kill_at, 2) if exited_at is not None else None
        ),
        # Still running when the check ended (the stack stops it at the end).
        "killed_alive_after_s": (
            round(time.monotonic() - kill_at, 1) if exited_at is None else None
        ),
        "lost_sockets": final["lost"],
        "recovered_sockets": final["recovered"],
        "all_recovered": all_back,
        "reconnect_s": round(recovered_at - kill_at, 2) if all_back else None,
        "recover_p50_s": round(percentile(recover, 0.5) / 1e6, 2) if recover else None,
        "recover_p99_s": round(percentile(recover, 0.99) / 1e6, 2) if recover else None,
        "other_servers_cpu_s": round(others_cpu, 2),
        "listen_overflows": overflows,
        "backlog": session.options.backlog,
        "reconnect_attempts": final["attempts"],
        "reconnect_failures": dict(final["reconnect_failures"]),
        "close_codes": dict(final["close_codes"]),
        "sent": final["sent"],
        "acked": acked,
        "unacked": final["unacked"],
        "expected_deliveries": final["expected"],
        "delivered": final["received"],
        "missed": final["missed"],
        "missed_at_or_below_since": final["missed_at_or_below_since"],
        "missed_by_sockets_down_at_the_end": final["missed_down"],
        "sockets_down_at_the_end": final["down"],
        "missed_by_sockets_never_disconnected": final["missed_kept"],
        # The acked messages (room, seq) that one socket or more missed.
        "missed_messages": [list(x) for x in final["missed_messages"][:20]],
        "missed_message_count": len(final["missed_messages"]),
        "missed_examples": final["missed_examples"][:3],
        "duplicates": final["duplicates"],
        "incomplete_recoveries": final["incomplete_recoveries"],
        "target_s": RECONNECT_TARGET_S,
        "met_target": bool(all_back and recovered_at - kill_at < RECONNECT_TARGET_S),
    }
    result["passed"] = result["met_target"] and final["missed"] == 0
    log(
        f"  reconnect storm: {final['recovered']}/{on_killed} sockets of "
        f"{killed.name} back in {result['reconnect_s']}s (p50 "
        f"{result['recover_p50_s']}s); acked {acked}, missed {final['missed']}, "
        f"duplicates {final['duplicates']}, unacked {final['unacked']}"
    )
    return result


def killed_server(session):
    return session.stack.servers[RECONNECT_KILLED]


def drain_storm(session, timeout=10.0, quiet=2.0):
    """Wait until every acked message reached every socket, or nothing moves."""
    deadline = time.monotonic() + timeout
    last, last_change = None, time.monotonic()
    while True:
        status = storm_status(session)
        status = storm_status(session, acked=status["acked"])
        moved = (status["received"], status["unacked"])
        if status["missed"] == 0 and status["unacked"] == 0:
            return status
        if moved != last:
            last, last_change = moved, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return status
        if time.monotonic() > deadline:
            return status
        time.sleep(0.2)


SCENARIOS = {
    "fanout100": lambda session: fanout(session, 100),
    "fanout1000": lambda session: fanout(session, 1000),
    "rooms": rooms,
    "idle": idle,
    "persist": persist,
    "joinstorm": joinstorm,
    "reconnectstorm": reconnectstorm,
}


def run_scenario(name, target, options, layout):
    log(f"{target.name}: {name}")
    began = time.monotonic()
    with Session(name, target, options, layout) as session:
        result = SCENARIOS[name](session)
    result["server_health"] = session.health
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    health = session.health
    if health["dead"] or health["errors"] or health.get("teardown_errors"):
        log(f"  server trouble: {health}")
    wanted = f"fast path {options.fast_path}"
    if target.name == "chatsite" and not all(
        line.startswith(wanted) for line in health["serving"]
    ):
        log(f"  asked for {wanted}, but the servers logged: {health['serving']}")
    return result
