"""The sockets of the storm scenarios (join storm, reconnect storm).

A ``Member`` is one client socket of those scenarios. It outlives its
connections: after a close it did not ask for, it reconnects (to its failover
URL, after ``chat.client.reconnect_delay``) and rejoins its room with ``since``
set to the highest seq it has seen. It parses every frame and keeps every seq
it received, so the harness can check each acknowledged message against each
socket of its room; it counts presence frames and the names they carry.
"""

import asyncio
import itertools
import json
import time
from array import array
from collections import Counter, defaultdict

from picows import WSCloseCode, WSListener, WSMsgType, ws_connect

HANDSHAKE_TIMEOUT = 60.0


class MemberConnection(WSListener):
    """One connection of a ``Member``: hello, join, (recovery), then live frames."""

    def __init__(self, member, rejoin):
        self.member = member
        self.rejoin = rejoin
        self.transport = None
        self.close_code = None
        self.close_reason = None
        self.hello = False
        self.ready = asyncio.get_running_loop().create_future()

    def stage(self):
        """How far a connection that failed had come."""
        if self.transport is None:
            return "before the upgrade"
        if not self.hello:
            return "upgraded, no hello"
        return "hello, no joined" if not self.rejoin else "hello, no recovered"

    def on_ws_connected(self, transport):
        self.transport = transport

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()
            self.close_reason = frame.get_close_message()
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        self.member.on_frame(self, json.loads(frame.get_payload_as_bytes()))

    def on_ws_disconnected(self, transport):
        if not self.ready.done():
            self.ready.set_exception(
                ConnectionError(
                    f"closed before joining ({self.close_code} {self.close_reason})"
                )
            )
        self.member.on_disconnected(self)

    def send_json(self, frame):
        self.transport.send(WSMsgType.TEXT, json.dumps(frame).encode())


class Member:
    """A socket of the storm scenarios, across its reconnects."""

    def __init__(self, client, number, spec):
        self.client = client
        self.number = number
        self.url = spec["url"]
        self.failover = spec.get("failover") or spec["url"]
        self.room = spec["room"]
        self.sender = spec["sender"]
        self.server = spec.get("server")  # the index of the first server
        self.conn = None
        self.live = False  # joined (and, after a reconnect, recovered)
        self.seqs = set()
        self.duplicates = 0
        self.first_seq = None  # last_seq of the first joined: the room before us
        self.max_seq = None
        self.sinces = []
        self.incomplete_recoveries = 0
        self.close_codes = []
        self.lost_ns = None  # when the live connection went away
        self.recovered_ns = None  # when the rejoin got ``recovered``
        self.attempts = 0  # reconnect attempts, failed ones included
        self.joined_ns = None
        self.presence = 0
        self.presence_names = 0
        self.batches = 0
        self.batch_names = 0
        self.last_presence_ns = 0
        self.pending = {}  # client_msg_id -> frame, until acked
        self.sent = 0

    # --- frames ----------------------------------------------------------------

    def on_frame(self, conn, frame):
        kind = frame.get("type")
        if kind == "message":
            if frame.get("room") == self.room:
                self.on_seq(frame["seq"])
        elif kind == "hello":
            conn.hello = True
            join = {"type": "join", "room": self.room}
            if conn.rejoin:
                join["since"] = self.max_seq
                self.sinces.append(self.max_seq)
            conn.send_json(join)
        elif kind == "joined":
            if self.first_seq is None:
                self.first_seq = frame["last_seq"]
            if self.max_seq is None:
                self.max_seq = frame["last_seq"]
            if not conn.rejoin:
                self.joined_ns = time.monotonic_ns()
                self.go_live(conn)
        elif kind == "recovered":
            if not frame.get("complete", True):
                self.incomplete_recoveries += 1
            if conn.rejoin and not conn.ready.done():
                self.recovered_ns = time.monotonic_ns()
                self.go_live(conn)
                # Sends the old connection left unacknowledged, again: the
                # server answers a repeated client_msg_id with the same ack.
                for pending in self.pending.values():
                    conn.send_json(pending)
        elif kind == "ack":
            if self.pending.pop(frame["client_msg_id"], None) is not None:
                self.client.storm_acked[frame["room"]].add(frame["seq"])
        elif kind == "presence":
            self.presence += 1
            self.presence_names += 1
            self.last_presence_ns = time.monotonic_ns()
        elif kind == "presence_batch":
            self.batches += 1
            self.batch_names += len(frame["online"]) + len(frame["offline"])
            self.last_presence_ns = time.monotonic_ns()
        elif kind == "error":
            self.client.errors[frame.get("code", "?")] += 1
            if not conn.ready.done():
                conn.ready.set_exception(ConnectionError(f"error frame {frame}"))

    def on_seq(self, seq):
        if seq in self.seqs:
            self.duplicates += 1
        else:
            self.seqs.add(seq)
        if self.max_seq is None or seq > self.max_seq:
            self.max_seq = seq

    def go_live(self, conn):
        self.live = True
        if not conn.ready.done():
            conn.ready.set_result(True)

    def on_disconnected(self, conn):
        if conn is not self.conn or not conn.ready.done() or conn.ready.exception():
            return  # a connection that never joined: open() retries
        self.live = False
        self.close_codes.append(conn.close_code)
        if self.client.closing:
            return
        self.lost_ns = time.monotonic_ns()
        self.recovered_ns = None
        self.client.tasks.add(asyncio.create_task(self.reconnect(conn.close_code)))

    # --- connecting --------------------------------------------------------------

    async def open(self, url, rejoin):
        conn = MemberConnection(self, rejoin)
        self.conn = conn
        try:
            await ws_connect(
                lambda: conn, url, websocket_handshake_timeout=HANDSHAKE_TIMEOUT
            )
            await asyncio.wait_for(conn.ready, HANDSHAKE_TIMEOUT)
        except Exception as exc:
            if conn.transport is not None:
                conn.transport.disconnect()
            return f"{type(exc).__name__} {conn.stage()}: {str(exc)[-90:]}"
        return True

    async def reconnect(self, close_code):
        from chat.client import reconnect_delay

        attempt = 0
        while not self.client.closing:
            await asyncio.sleep(reconnect_delay(attempt, close_code))
            self.attempts += 1
            result = await self.open(self.failover, rejoin=True)
            if result is True:
                return
            self.client.reconnect_failures[result] += 1
            attempt += 1

    def send(self):
        self.sent += 1
        client_msg_id = f"{self.client.tag}.storm.{self.number}.{self.sent}"
        frame = {
            "type": "send",
            "room": self.room,
            "body": f"storm message {client_msg_id}",
            "client_msg_id": client_msg_id,
        }
        self.pending[client_msg_id] = frame
        self.conn.send_json(frame)


class StormCommands:
    """The storm scenarios' commands of a client process (``loadgen.Client``)."""

    def storm_init(self):
        self.members = []
        self.numbers = itertools.count()
        self.tasks = set()
        self.storm_acked = defaultdict(set)  # room -> acknowledged seqs
        self.reconnect_failures = Counter()
        self.sending = None

    def storm_close(self):
        if self.sending is not None:
            self.sending.cancel()
        for member in self.members:
            if member.conn is not None and member.conn.transport is not None:
                member.conn.transport.disconnect()

    async def do_storm_connect(self, sockets, concurrency):
        """Open Members; each first connection joins without ``since``."""
        limit = asyncio.Semaphore(concurrency)
        start = time.monotonic_ns()

        async def one(spec):
            async with limit:
                member = Member(self, next(self.numbers), spec)
                began = time.monotonic_ns()
                result = await member.open(member.url, rejoin=False)
                if result is True:
                    self.members.append(member)
                    return result, member.joined_ns - began
                return result, None

        cpu = time.process_time()
        results = await asyncio.gather(*(one(spec) for spec in sockets))
        failures = [r for r, _ in results if r is not True]
        return {
            "connected": len(results) - len(failures),
            "failed": len(failures),
            "failures": Counter(failures).most_common(3),
            "start_ns": start,
            "end_ns": time.monotonic_ns(),
            "last_joined_ns": max(
                (m.joined_ns for m in self.members if m.joined_ns), default=0
            ),
            "join_us": array("q", [t // 1000 for _, t in results if t]).tobytes(),
            "cpu": time.process_time() - cpu,
            "by_server": dict(Counter(m.server for m in self.members)),
        }

    async def do_storm_presence(self):
        members = self.members
        return {
            "presence": sum(m.presence for m in members),
            "presence_names": sum(m.presence_names for m in members),
            "presence_batch": sum(m.batches for m in members),
            "presence_batch_names": sum(m.batch_names for m in members),
            "last_presence_ns": max((m.last_presence_ns for m in members), default=0),
            "errors": dict(self.errors),
        }

    async def do_storm_senders(self, rate):
        """Start (rate > 0) or stop (0) every sender Member sending ``rate`` msgs/s."""
        if self.sending is not None:
            self.sending.cancel()
            self.sending = None
        senders = [m for m in self.members if m.sender]
        if rate > 0 and senders:
            self.sending = asyncio.create_task(_pace_members(senders, rate))
        return {"senders": len(senders)}

    async def do_storm_status(self, acked=None):
        """Where the Members are: lost and recovered, unacked; missing if ``acked``."""
        members = self.members
        lost = [m for m in members if m.lost_ns is not None]
        recovered = [m for m in lost if m.recovered_ns is not None]
        status = {
            "members": len(members),
            "live": sum(m.live for m in members),
            "lost": len(lost),
            "recovered": len(recovered),
            "last_recovered_ns": max((m.recovered_ns for m in recovered), default=0),
            "recover_us": array(
                "q", [(m.recovered_ns - m.lost_ns) // 1000 for m in recovered]
            ).tobytes(),
            "attempts": sum(m.attempts for m in members),
            "reconnect_failures": dict(self.reconnect_failures.most_common(3)),
            "close_codes": dict(Counter(c for m in members for c in m.close_codes)),
            "sent": sum(m.sent for m in members),
            "unacked": sum(len(m.pending) for m in members),
            "acked": {room: sorted(seqs) for room, seqs in self.storm_acked.items()},
            "errors": dict(self.errors),
        }
        if acked is not None:
            status.update(_check(members, {r: set(s) for r, s in acked.items()}))
        return status


async def _pace_members(senders, rate):
    """Each sender sends ``rate`` msgs/s while it is live (phases spread)."""
    interval = 1.0 / rate
    await asyncio.sleep(interval * 0.5)
    spacing = interval / len(senders)
    next_at = [time.monotonic() + i * spacing for i in range(len(senders))]
    while True:
        now = time.monotonic()
        for i, member in enumerate(senders):
            if next_at[i] <= now:
                next_at[i] += interval
                if member.live:
                    member.send()
        await asyncio.sleep(max(0.0, min(next_at) - time.monotonic()))


def _check(members, acked):
    """Every acknowledged seq of a room against every socket of the room."""
    expected = received = missed = below_since = missed_down = down = 0
    missed_kept = 0  # by sockets that never lost their connection
    messages = set()  # (room, seq) missed by one socket or more
    examples = []
    for m in members:
        down += not m.live
        want = {s for s in acked.get(m.room, ()) if s > m.first_seq}
        missing = want - m.seqs
        expected += len(want)
        received += len(want) - len(missing)
        missed += len(missing)
        messages.update((m.room, seq) for seq in missing)
        if m.lost_ns is None:
            missed_kept += len(missing)
        if not m.live:
            missed_down += len(missing)
        if missing:
            since = max((s for s in m.sinces if s is not None), default=None)
            below_since += sum(1 for s in missing if since is not None and s <= since)
            if len(examples) < 3:
                examples.append(
                    {"room": m.room, "missing": sorted(missing)[:5], "sinces": m.sinces}
                )
    return {
        "expected": expected,
        "received": received,
        "missed": missed,
        "missed_at_or_below_since": below_since,
        "missed_down": missed_down,  # by sockets not back (yet) when checked
        "missed_kept": missed_kept,
        "missed_messages": sorted(messages),
        "down": down,
        "missed_examples": examples,
        "duplicates": sum(m.duplicates for m in members),
        "incomplete_recoveries": sum(m.incomplete_recoveries for m in members),
    }
