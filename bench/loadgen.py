"""The load generator: client processes that each hold many WebSockets (picows).

The harness drives each process over a pipe with commands: ``connect`` sockets,
``run`` a step (send at an offered rate, or keep a window of unacknowledged
sends), ``count`` what arrived, ``collect`` the step's figures, ``close``; and
the storm scenarios' ``storm_*`` commands (``bench/members.py``).

A message carries its step and its send time in its body
(``~<step>~<monotonic ns>~xxx…``), so whichever process receives it measures
its latency: CLOCK_MONOTONIC is one clock for every process of the machine.
Every delivered message is counted per room, so the harness can compare what
arrived with what was acknowledged times the room's members: loss is counted.
"""

import asyncio
import heapq
import json
import os
import time
from array import array
from collections import Counter, defaultdict

from picows import WSListener, WSMsgType, ws_connect

from bench.members import StormCommands

MARK = b"~"
BODY_CHARS = 100
HANDSHAKE_TIMEOUT = 60.0
LATE_SEND_NS = 20_000_000  # a send this far behind its schedule counts as late


def body(step, sent_ns):
    head = f"~{step}~{sent_ns}~"
    return head + "x" * (BODY_CHARS - len(head))


class BenchSocket(WSListener):
    """One WebSocket: joins its room, counts deliveries, sends when told."""

    def __init__(self, client, room, sender):
        self.client = client
        self.room = room
        self.sender = sender
        self.transport = None
        self.ready = asyncio.get_running_loop().create_future()
        self.received = Counter()  # step -> messages delivered to this socket
        self.pending = {}  # client_msg_id -> (step, send ns), until acked
        self.sent_count = 0
        self.other_frames = 0

    # --- picows callbacks ----------------------------------------------------

    def on_ws_connected(self, transport):
        self.transport = transport
        if self.client.kind == "baseline":
            # The tutorial consumer joins the room's group before it accepts.
            self.ready.set_result(True)

    def on_ws_frame(self, transport, frame):
        if frame.msg_type != WSMsgType.TEXT:
            return
        data = frame.get_payload_as_bytes()
        start = data.find(MARK)
        if start >= 0:
            now = time.monotonic_ns()
            middle = data.index(MARK, start + 1)
            end = data.index(MARK, middle + 1)
            step = int(data[start + 1 : middle])
            self.received[step] += 1
            self.client.latency(step).append(
                (now - int(data[middle + 1 : end])) // 1000
            )
            return
        self.on_control(json.loads(data))

    def on_ws_disconnected(self, transport):
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before joining"))
        elif not self.client.closing:
            self.client.dropped += 1

    # --- chatsite frames ---------------------------------------------------------

    def on_control(self, frame):
        kind = frame.get("type")
        if kind == "ack":
            self.on_ack(frame["client_msg_id"])
        elif kind == "hello":
            self.send_text(json.dumps({"type": "join", "room": self.room}))
        elif kind == "joined" and not self.ready.done():
            self.ready.set_result(True)
        elif kind == "error":
            self.client.errors[frame.get("code", "?")] += 1
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(f"error frame {frame}"))
        else:
            self.other_frames += 1

    def on_ack(self, client_msg_id):
        entry = self.pending.pop(client_msg_id, None)
        if entry is None:
            return
        step, sent_ns = entry
        now = time.monotonic_ns()
        self.client.acked(step, self.room, now, (now - sent_ns) // 1000)
        if self.client.window_open(now):
            self.send_message(step)

    # --- sending -----------------------------------------------------------------

    def send_text(self, text):
        self.transport.send(WSMsgType.TEXT, text.encode())

    def send_message(self, step):
        sent_ns = time.monotonic_ns()
        self.sent_count += 1
        text = body(step, sent_ns)
        if self.client.kind == "baseline":
            # The tutorial's frame; it has no ack, so a sent message counts as
            # accepted (and is expected at every member of the room).
            self.send_text(f'{{"message":"{text}"}}')
            self.client.sent[step][self.room] += 1
            self.client.acked(step, self.room, sent_ns, None)
            return
        client_msg_id = f"{self.client.tag}.{self.sent_count}"
        self.pending[client_msg_id] = (step, sent_ns)
        self.send_text(
            f'{{"type":"send","room":"{self.room}","body":"{text}",'
            f'"client_msg_id":"{client_msg_id}"}}'
        )
        self.client.sent[step][self.room] += 1


class Client(StormCommands):
    """One client process: its sockets and what they counted, per step."""

    def __init__(self, pipe, index, kind):
        self.pipe = pipe
        self.index = index
        self.kind = kind
        self.sockets = []
        self.closing = False
        self.dropped = 0
        self.errors = Counter()
        self.tag = f"w{index}"
        self.latencies = {}  # step -> array of latencies in µs
        self.ack_latencies = defaultdict(lambda: array("q"))
        self.sent = defaultdict(Counter)  # step -> room -> sends
        self.acks = defaultdict(Counter)  # step -> room -> acks
        self.acks_in_window = Counter()  # step -> acks received before the end
        self.window_end_ns = 0
        self.window_step = None
        self.storm_init()

    def latency(self, step):
        values = self.latencies.get(step)
        if values is None:
            values = self.latencies[step] = array("q")
        return values

    def acked(self, step, room, now_ns, latency_us):
        self.acks[step][room] += 1
        if now_ns <= self.window_end_ns:
            self.acks_in_window[step] += 1
        if latency_us is not None:
            self.ack_latencies[step].append(latency_us)

    def window_open(self, now_ns):
        return self.window_step is not None and now_ns < self.window_end_ns

    # --- commands ------------------------------------------------------------------

    async def serve(self):
        loop = asyncio.get_running_loop()
        commands = asyncio.Queue()
        loop.add_reader(
            self.pipe.fileno(), lambda: commands.put_nowait(self.pipe.recv())
        )
        while True:
            command = await commands.get()
            op = command.pop("op")
            if op == "close":
                self.closing = True
                for sock in self.sockets:
                    sock.transport.disconnect()
                self.storm_close()
                self.pipe.send({"closed": len(self.sockets) + len(self.members)})
                return
            result = await getattr(self, f"do_{op}")(**command)
            self.pipe.send(result)

    async def do_connect(self, sockets, concurrency):
        limit = asyncio.Semaphore(concurrency)
        cpu, wall = time.process_time(), time.monotonic()
        results = await asyncio.gather(*(self._open(spec, limit) for spec in sockets))
        failures = [r for r in results if r is not True]
        pairs = zip(sockets, results, strict=True)
        rooms = Counter(spec["room"] for spec, result in pairs if result is True)
        return {
            "connected": len(results) - len(failures),
            "rooms": dict(rooms),
            "failed": len(failures),
            "failures": Counter(failures).most_common(3),
            "seconds": time.monotonic() - wall,
            "cpu": time.process_time() - cpu,
        }

    async def _open(self, spec, limit):
        async with limit:
            sock = BenchSocket(self, spec["room"], spec["sender"])
            try:
                await ws_connect(
                    lambda: sock,
                    spec["url"],
                    extra_headers=spec.get("headers"),
                    websocket_handshake_timeout=HANDSHAKE_TIMEOUT,
                )
                await asyncio.wait_for(sock.ready, HANDSHAKE_TIMEOUT)
            except Exception as exc:
                if sock.transport is not None:
                    sock.transport.disconnect()
                return f"{type(exc).__name__}: {str(exc)[:120]}"
            self.sockets.append(sock)
            return True

    async def do_run(
        self, step, tag, start, duration, mode, drain, rate=0.0, window=0, phase=0.0
    ):
        """Send for ``duration`` seconds from ``start``; wait for the acks."""
        self.tag = f"w{self.index}.{tag}"
        senders = [sock for sock in self.sockets if sock.sender]
        end = start + duration
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu, wall = time.process_time(), time.monotonic()
        lateness = []
        if mode == "rate":
            lateness = await self._pace(senders, step, rate, end, phase)
        else:
            self.window_end_ns = int(end * 1e9)
            self.window_step = step
            for sock in senders:
                for _ in range(window):
                    sock.send_message(step)
            await asyncio.sleep(max(0.0, end - time.monotonic()))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        self.window_step = None
        deadline = time.monotonic() + drain
        while any(s.pending for s in senders) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        late = [x for x in lateness if x > LATE_SEND_NS]
        return {
            "sent": dict(self.sent[step]),
            "acked": dict(self.acks[step]),
            "acked_in_window": self.acks_in_window[step],
            "unacked": sum(len(s.pending) for s in senders),
            "cpu": cpu,
            "wall": wall,
            "late_sends": len(late),
            "max_lateness_ms": max(lateness, default=0) / 1e6,
        }

    async def _pace(self, senders, step, rate, end, phase):
        """Open loop: each sender sends ``rate`` msgs/s, phases spread evenly.

        ``phase`` (0..1) places this process's senders between those of the
        others, so the room sees one evenly spaced stream.
        """
        if not senders or rate <= 0:
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            return []
        interval_ns = int(1e9 / rate)
        start_ns, end_ns = time.monotonic_ns(), int(end * 1e9)
        spacing = interval_ns / len(senders)
        queue = [
            (start_ns + int((i + phase) * spacing), i)
            for i in range(len(senders))
            if start_ns + int((i + phase) * spacing) < end_ns
        ]
        heapq.heapify(queue)
        lateness = []
        while queue:
            now = time.monotonic_ns()
            while queue and queue[0][0] <= now:
                due, i = heapq.heappop(queue)
                lateness.append(now - due)
                senders[i].send_message(step)
                if due + interval_ns < end_ns:
                    heapq.heappush(queue, (due + interval_ns, i))
            if queue:
                await asyncio.sleep(max(0, queue[0][0] - time.monotonic_ns()) / 1e9)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        return lateness

    async def do_count(self, step):
        return {
            "received": sum(s.received[step] for s in self.sockets),
            "dropped": self.dropped,
        }

    async def do_collect(self, step):
        received = Counter()
        for sock in self.sockets:
            received[sock.room] += sock.received.pop(step, 0)
        latencies = self.latencies.pop(step, array("q"))
        ack_latencies = self.ack_latencies.pop(step, array("q"))
        return {
            "received": dict(received),
            "latencies": latencies.tobytes(),
            "ack_latencies": ack_latencies.tobytes(),
            "dropped": self.dropped,
            "errors": dict(self.errors),
            "other_frames": sum(s.other_frames for s in self.sockets),
        }


def worker_main(pipe, index, kind, cpus):
    """Entry point of a client process."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    asyncio.run(Client(pipe, index, kind).serve())
