"""Client-side CPU per received frame: ChatClient against bare picows listeners.

    python -m bench.clientcost                        # 50 sockets x 2,000 frames
    python -m bench.clientcost --sockets 50 --frames 2000 --rounds 5 --output x.json

Why the load generator is not ``chat.client.ChatClient``: it has to cost far
less CPU per frame than the server it measures. This measures what each client
costs per ``message`` frame it receives, with the same server for all:

- ``ChatClient``: JSON framing, ``ordered=False``; every ``message`` frame
  goes into its ``events`` queue and a consumer task per socket drains it.
  Again with ``record=True`` (every frame kept, decoded and as it came).
- ``picows json.loads``: a picows ``WSListener`` that parses every frame with
  ``json.loads`` and keeps its seq, as ``bench/members.py`` does.
- ``picows mark scan``: the fan-out path of ``bench/loadgen.py``, which finds
  the step and send time in the body without parsing the JSON at all.

The server is a picows server in a process of its own (``--serve``), so that
``time.process_time()`` here counts the client only. Each socket gets a
``hello`` shaped like chatsite's; on ``join`` it answers ``joined`` and then
sends the frames as fast as it can: ``message`` frames built and encoded by
``chat.protocol`` (about 300 bytes: a 100-character body as the benchmark
sends, a fresh id and seq each), then a close. The client's CPU is counted
from the first ``join`` to the last socket's last frame, and divided by the
frames received. Each round runs every client once, in turn; the table gives
the median of the rounds and their spread, and each client's cost over that
of ``picows json.loads`` in the same round (the median and the range of those
ratios). "client busy" is the client's CPU over the wall time: under 100 % the
client waited for the server, and then it reads fewer frames per wake-up.
"""

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from array import array
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from picows import (
    WSCloseCode,
    WSListener,
    WSMsgType,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_connect,
    ws_create_server,
)

from chat import protocol
from chat.client import ChatClient

ROOT = Path(__file__).resolve().parent.parent
ROOM = "lobby"
BODY_CHARS = 100  # as bench/loadgen.py's bodies
MARK = b"~"
TIMEOUT = 300.0
CLIENTS = ("chatclient", "chatclient-record", "picows-json", "picows-mark")
LABELS = {
    "chatclient": "ChatClient (JSON, ordered=False)",
    "chatclient-record": "ChatClient, record=True",
    "picows-json": "picows, json.loads per frame",
    "picows-mark": "picows, mark scan (loadgen.py)",
}


# --- the server (its own process) ---------------------------------------------------


def message_frames(count):
    """``count`` message frames as chatsite encodes them, seqs 1..count."""
    sent_ns = time.monotonic_ns()
    frames = []
    for seq in range(1, count + 1):
        head = f"~0~{sent_ns}~"
        frame = protocol.message(
            protocol.MessageData(
                room=ROOM,
                id=100_000 + seq,
                seq=seq,
                user=protocol.User(id=7, username="bench00007"),
                body=head + "x" * (BODY_CHARS - len(head)),
                created_at="2026-12-03T12:00:00.123Z",
                client_msg_id=f"w0.s1.{seq}",
                edited_at=None,
                deleted=False,
            )
        )
        frames.append(protocol.encode(frame).text.encode())
    return frames


class ServerSocket(WSListener):
    def __init__(self, server, number):
        self.server = server
        self.number = number

    def on_ws_connected(self, transport):
        hello = protocol.hello(
            connection_id=f"{os.getpid():08x}-{self.number}",
            user=_User(self.number),
            heartbeat=3600,
        )
        transport.send(WSMsgType.TEXT, protocol.encode(hello).text.encode())

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        request = json.loads(frame.get_payload_as_bytes())
        if request.get("type") != "join":
            return
        self.server.started()
        joined = {
            "type": "joined",
            "room": ROOM,
            "title": "Lobby",
            "last_seq": 0,
            "online": [],
            "online_count": 1,
            "read_seq": 0,
            "private": False,
            "direct": False,
            "closed": False,
        }
        if request.get("ref") is not None:
            joined["ref"] = request["ref"]
        transport.send(WSMsgType.TEXT, json.dumps(joined).encode())
        for payload in self.server.frames:
            transport.send(WSMsgType.TEXT, payload)
        transport.send_close(WSCloseCode.OK)

    def on_ws_disconnected(self, transport):
        self.server.ended()


class _User:
    def __init__(self, number):
        self.pk = number

    def get_username(self):
        return f"bench{self.pk:05d}"


class Server:
    """Serves ``sockets`` sockets, each sent ``frames`` frames, then exits."""

    def __init__(self, sockets, frames):
        self.sockets = sockets
        self.frames = message_frames(frames)
        self.connected = 0
        self.disconnected = 0
        self.cpu_start = None
        self.done = None

    def started(self):
        if self.cpu_start is None:
            self.cpu_start = time.process_time()

    def ended(self):
        self.disconnected += 1
        if self.disconnected >= self.sockets and not self.done.done():
            self.done.set_result(time.process_time())

    def listener(self, request):
        self.connected += 1
        listener = ServerSocket(self, self.connected)
        offered = request.headers.get("sec-websocket-protocol", "")
        if protocol.SUBPROTOCOL_JSON in [p.strip() for p in offered.split(",")]:
            response = WSUpgradeResponse.create_101_response(
                extra_headers={"Sec-WebSocket-Protocol": protocol.SUBPROTOCOL_JSON}
            )
            return WSUpgradeResponseWithListener(response, listener)
        return listener

    async def serve(self):
        self.done = asyncio.get_running_loop().create_future()
        server = await ws_create_server(self.listener, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(f"port {port}", flush=True)
        cpu_end = await asyncio.wait_for(self.done, TIMEOUT)
        server.close()
        print(f"cpu {cpu_end - (self.cpu_start or cpu_end)}", flush=True)


def serve_main(sockets, frames):
    try:
        import uvloop
    except ImportError:
        asyncio.run(Server(sockets, frames).serve())
    else:
        uvloop.run(Server(sockets, frames).serve())


# --- the clients --------------------------------------------------------------------


async def run_chatclient(url, sockets, frames, record):
    clients = [
        ChatClient(url, token=f"t{i}", reconnect=False, record=record, name=f"c{i}")
        for i in range(sockets)
    ]
    await asyncio.gather(*(client.connect() for client in clients))
    received = Counter()

    async def consume(client):
        await client.join(ROOM)
        seen = 0
        while seen < frames:
            frame = await client.events.get()
            if frame["type"] == "message":
                seen += 1
                received[frame["room"]] += 1

    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(consume(client) for client in clients)), TIMEOUT
    )
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await asyncio.gather(*(client.close() for client in clients))
    return cpu, wall, received[ROOM]


class JsonSocket(WSListener):
    """Parses every frame with json.loads and keeps its seq (bench/members.py)."""

    def __init__(self, frames):
        self.frames = frames
        self.received = 0
        self.seqs = set()
        loop = asyncio.get_running_loop()
        self.hello = loop.create_future()
        self.done = loop.create_future()
        self.transport = None

    def on_ws_connected(self, transport):
        self.transport = transport

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        self.on_frame(json.loads(frame.get_payload_as_bytes()))

    def on_frame(self, frame):
        kind = frame.get("type")
        if kind == "message":
            if frame.get("room") == ROOM:
                self.seqs.add(frame["seq"])
                self.received += 1
                if self.received == self.frames:
                    self.done.set_result(True)
        elif kind == "hello":
            self.hello.set_result(True)

    def on_ws_disconnected(self, transport):
        for waiting in (self.hello, self.done):
            if not waiting.done():
                waiting.set_exception(ConnectionError("closed early"))

    def join(self):
        join = {"type": "join", "room": ROOM}
        self.transport.send(WSMsgType.TEXT, json.dumps(join).encode())


class MarkSocket(JsonSocket):
    """bench/loadgen.py's path: a message's step and send time found in its body."""

    def __init__(self, frames):
        super().__init__(frames)
        self.steps = Counter()
        self.latencies = array("q")

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        data = frame.get_payload_as_bytes()
        start = data.find(MARK)
        if start >= 0:
            now = time.monotonic_ns()
            middle = data.index(MARK, start + 1)
            end = data.index(MARK, middle + 1)
            step = int(data[start + 1 : middle])
            self.steps[step] += 1
            self.latencies.append((now - int(data[middle + 1 : end])) // 1000)
            self.received += 1
            if self.received == self.frames:
                self.done.set_result(True)
            return
        self.on_frame(json.loads(data))


async def run_picows(url, sockets, frames, kind):
    listeners = [kind(frames) for _ in range(sockets)]
    await asyncio.gather(
        *(ws_connect(lambda sock=sock: sock, url) for sock in listeners)
    )
    await asyncio.gather(*(sock.hello for sock in listeners))
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    for sock in listeners:
        sock.join()
    await asyncio.wait_for(asyncio.gather(*(s.done for s in listeners)), TIMEOUT)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    for sock in listeners:
        sock.transport.disconnect()
    return cpu, wall, sum(sock.received for sock in listeners)


async def measure(client, sockets, frames):
    """One run of one client against a fresh server process."""
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.clientcost", "--serve"]
        + ["--sockets", str(sockets), "--frames", str(frames)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = await asyncio.to_thread(server.stdout.readline)
        if not line.startswith("port "):
            raise RuntimeError(f"the server did not start: {line!r}")
        url = f"ws://127.0.0.1:{int(line.split()[1])}/ws/"
        if client.startswith("chatclient"):
            record = client == "chatclient-record"
            cpu, wall, received = await run_chatclient(url, sockets, frames, record)
        else:
            kind = JsonSocket if client == "picows-json" else MarkSocket
            cpu, wall, received = await run_picows(url, sockets, frames, kind)
        out, _ = await asyncio.to_thread(server.communicate, timeout=TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    server_cpu = float(out.split()[-1]) if out.startswith("cpu ") else None
    if received != sockets * frames:
        raise RuntimeError(f"{client}: {received} of {sockets * frames} frames")
    return {
        "client_cpu_s": cpu,
        "wall_s": wall,
        "frames": received,
        "client_us_per_frame": cpu / received * 1e6,
        "client_cpu_share": cpu / wall if wall else None,
        "server_cpu_s": server_cpu,
        "server_us_per_frame": (
            server_cpu / received * 1e6 if server_cpu is not None else None
        ),
    }


# --- the command --------------------------------------------------------------------


def summarize(runs, base_runs):
    figures = [run["client_us_per_frame"] for run in runs]
    median = statistics.median(figures)
    # Against the base client of the same round: the two ran a few seconds
    # apart, so a ratio suffers less from the machine's other work than either.
    ratios = [
        run["client_us_per_frame"] / base["client_us_per_frame"]
        for run, base in zip(runs, base_runs, strict=True)
    ]
    return {
        "client_us_per_frame": median,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "min": min(figures),
        "max": max(figures),
        "spread": (max(figures) - min(figures)) / median,
        "client_cpu_share": statistics.median(r["client_cpu_share"] for r in runs),
        "server_us_per_frame": statistics.median(
            r["server_us_per_frame"] or 0.0 for r in runs
        ),
    }


def table(summary, base):
    rows = [
        (
            "client",
            "µs/frame",
            "min-max",
            "spread",
            f"× {base} (min-max)",
            "client busy",
            "server µs/frame",
        )
    ]
    for client, s in summary.items():
        rows.append(
            (
                LABELS[client],
                f"{s['client_us_per_frame']:.1f}",
                f"{s['min']:.1f}-{s['max']:.1f}",
                f"{s['spread']:.0%}",
                f"{s['ratio']:.1f} ({s['ratio_min']:.1f}-{s['ratio_max']:.1f})",
                f"{s['client_cpu_share']:.0%}",
                f"{s['server_us_per_frame']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        pairs = zip(row[1:], widths[1:], strict=True)
        cells += [cell.rjust(width) for cell, width in pairs]
        lines.append("  ".join(cells))
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


async def main_async(args):
    clients = args.clients.split(",")
    runs = {client: [] for client in clients}
    for number in range(args.rounds):
        for client in clients:
            run = await measure(client, args.sockets, args.frames)
            runs[client].append(run)
            print(
                f"round {number + 1}/{args.rounds} {client}: "
                f"{run['client_us_per_frame']:.1f} µs/frame "
                f"({run['client_cpu_s']:.2f} s CPU in {run['wall_s']:.2f} s)",
                file=sys.stderr,
                flush=True,
            )
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=50)
    parser.add_argument("--frames", type=int, default=2000, help="per socket")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--output", help="write every figure to this JSON file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_main(args.sockets, args.frames)
        return
    unknown = set(args.clients.split(",")) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients {sorted(unknown)}; known: {CLIENTS}")
    runs = asyncio.run(main_async(args))
    base = "picows-json" if "picows-json" in runs else next(iter(runs))
    summary = {client: summarize(each, runs[base]) for client, each in runs.items()}
    frame_bytes = len(message_frames(1)[0])
    print(
        f"{args.sockets} sockets x {args.frames} message frames of {frame_bytes} "
        f"bytes, {args.rounds} rounds (median; spread = (max - min) / median), "
        f"{os.cpu_count()} cores"
    )
    print(table(summary, base))
    if args.output:
        import picows
        import websockets

        result = {
            "meta": {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "python": sys.version.split()[0],
                "picows": picows.__version__,
                "websockets": websockets.__version__,
                "cores": os.cpu_count(),
                "sockets": args.sockets,
                "frames_per_socket": args.frames,
                "frame_bytes": frame_bytes,
                "rounds": args.rounds,
            },
            "summary": summary,
            "runs": runs,
        }
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
