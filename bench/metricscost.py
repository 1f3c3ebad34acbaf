"""What the ``/metrics`` counters cost the fan-out, in instructions.

``python -m bench.metricscost`` builds the real fan-out hub (``chat.fanout.Hub``)
on the in-memory channel layer with one room of ``--sockets`` sockets, takes
``--events`` stored-message broadcasts as the hubs get them (``publish_many``
through the layer, then ``layer.receive``) and hands them to ``Hub.deliver``
twice over: once with ``chat.metrics`` as it is, once with every counter of it
replaced by a no-op. Each socket is a real ``ChatConsumer`` whose ``write_now``
runs as in daphne, down to ``serving.write_bytes``; only the kernel's
``send()`` is replaced by ``len`` (the system call is the same with and
without counters and is not an instruction of this process).

Per broadcast the loop also makes the counter calls of the sending side: the
sender's ``frame_in("send")``, its ack's ``frames_out_add("ack")`` and the
writer's ``messages_stored.inc()``. In the benchmark only one server process
makes those per message, so counting them in every process's hub is an upper
bound.

The instructions are counted by valgrind's callgrind, which the command runs
itself on a child process: collection is on only inside ``sys.call_tracing``,
which wraps each measured pass and nothing else, and each pass is dumped on its
own. Start-up, imports and set-up do not count. The passes run in the order
counters, no-op, counters, no-op; the two of one variant agree to within about
12 instructions per delivery (the collector's timing and memory layouts differ
between passes and between processes), so the figure is the mean of both.
Before the passes the garbage collector freezes what set-up left, and each
pass starts after a collection, so that no pass pays for another's garbage.

The no-op stubs are still called: two more passes, without the hub, measure
the five stub calls per broadcast against an empty loop, and that call cost
is added to the counters' figure (what taking the calls out would save).

The callgrind child runs ``--runs`` times (default 2) to show the counts
repeat. A last child, without valgrind, times the same passes
(``time.process_time``, the quickest of ``--timing-rounds``) to turn
instructions into µs.

The delivery time a broadcast's histogram observes is fixed at 3 ms (the hub's
clock is replaced by a constant): under valgrind time runs ~50 times slower,
and the bucket search would otherwise depend on how slow.
"""

from __future__ import annotations

import argparse
import gc
import glob
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types

# The benchmark's fan-out figure (README, fan-out 1000 receivers): server CPU
# per delivery.
REAL_US_PER_DELIVERY = 28.5
BOUND_SHARE = 0.03
DELAY_S = 0.003  # the delivery time observed per broadcast (bucket <= 5 ms)
BODY_CHARS = 100  # the benchmark's message body


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="chatsite.settings",
        DJANGO_DEBUG="1",
        PYTHONHASHSEED="0",
    )
    env.pop("REDIS_URL", None)  # the in-memory channel layer
    return env


# --- the child: the workload ----------------------------------------------------


class _Null:
    """A counter, gauge or histogram that counts nothing."""

    def inc(self, amount=1):
        pass

    def dec(self, amount=1):
        pass

    def set(self, value):
        pass

    def observe(self, amount):
        pass

    def labels(self, *labelvalues):
        return self


def _noop_one(value):
    pass


def _noop_add(frame_type, count=1):
    pass


_NULL = _Null()
_FUNCTIONS = ("frame_in", "frames_out_add", "error_sent", "closed")
_OBJECTS = (
    "connections",
    "frames_in",
    "frames_out",
    "messages_stored",
    "delivery_seconds",
    "errors",
    "closes",
    "rate_limited",
)


def _variants(metrics):
    real = {name: getattr(metrics, name) for name in _FUNCTIONS + _OBJECTS}
    off = {name: _noop_one for name in _FUNCTIONS}
    off["frames_out_add"] = _noop_add
    off.update({name: _NULL for name in _OBJECTS})
    return {"counters": real, "no-op": off}


def _use(metrics, variant):
    for name, value in variant.items():
        setattr(metrics, name, value)


class _Transport:
    """What ``serving.write_bytes`` looks at on a plain TCP daphne socket."""

    TLS = False
    connected = True
    disconnecting = False
    offset = 0

    def __init__(self, send):
        self.socket = types.SimpleNamespace(send=send)
        self._tempDataBuffer = []
        self.dataBuffer = b""

    def write(self, data):
        raise AssertionError("every write should go straight to the socket")


class _Wire:
    STATE_OPEN = 3

    def __init__(self, send):
        self.state = self.STATE_OPEN
        self.transport = _Transport(send)


def _sockets(count, send):
    from chat import protocol
    from chat.consumers import ChatConsumer

    sockets = []
    for i in range(count):
        socket = ChatConsumer.__new__(ChatConsumer)
        socket.user_id = 1000 + i
        socket.wire = _Wire(send)
        socket.send_buffer = None
        socket.framing = protocol.framing(binary=False, gzip=False)
        sockets.append(socket)
    return sockets


def _frame(i):
    from chat import protocol

    head = f"~1~{1_000_000_000 + i}~"
    return protocol.MessageFrame(
        room="lobby",
        id=50_000 + i,
        seq=10_000 + i,
        user=protocol.User(id=1000 + i % 4, username=f"bench{i % 4:05d}"),
        body=head + "x" * (BODY_CHARS - len(head)),
        created_at="2026-12-03T15:00:00.000000Z",
        client_msg_id=f"c-{i:08d}",
        edited_at=None,
        deleted=False,
        mentions=[],
        reactions=[],
        reply_to=None,
        reply_count=0,
        attachments=[],
    )


async def _setup(sockets, events):
    """A hub with ``sockets`` in one room and ``events`` broadcasts to it."""
    from channels.layers import get_channel_layer

    from chat import fanout

    layer = get_channel_layer()
    hub = fanout.Hub(layer)
    # The hub's own channel, without its receive task: the passes call
    # deliver themselves with what the layer hands over.
    hub.channel_name = await layer.new_channel("hub.")
    group = fanout.room_group(1)
    for socket in sockets:
        await hub.add(group, socket)
        await hub.add(fanout.EVERYONE_GROUP, socket)
    received = []
    for i in range(events):
        await fanout.publish_many((((group,), (_frame(i),)),))
        received.append(await layer.receive(hub.channel_name))
    return hub, received


def _pass(hub, events, metrics):
    """One measured pass: each broadcast as the hub and the sender count it."""
    deliver = hub.deliver
    for event in events:
        # The sending side, once per stored message (see the module docstring).
        metrics.frame_in("send")
        metrics.frames_out_add("ack")
        metrics.messages_stored.inc()
        coroutine = deliver(event)
        try:
            coroutine.send(None)
        except StopIteration:
            pass
        else:
            raise RuntimeError("Hub.deliver waited: a socket was not written at once")


def _stub_calls(events, metrics):
    """The no-op variant's calls per broadcast, without the hub."""
    count = len(events[0]["multi"][0][1])
    for _event in events:
        metrics.frame_in("send")
        metrics.frames_out_add("ack")
        metrics.messages_stored.inc()
        metrics.frames_out_add("message", count)
        metrics.delivery_seconds.observe(DELAY_S)


def _empty(events, metrics):
    for _event in events:
        pass


def child(args) -> None:
    import asyncio

    import django

    django.setup()
    from chat import fanout, metrics

    writes = []

    def counting_send(data):
        writes.append(data)
        return len(data)

    sockets = _sockets(args.sockets, counting_send)
    hub, events = asyncio.run(_setup(sockets, args.events))
    now = time.time()
    for event in events:
        event["sent_at"] = now - DELAY_S
    # The hub's clock, stopped: every broadcast observes DELAY_S.
    fanout.time = types.SimpleNamespace(
        time=itertools.repeat(now).__next__, monotonic=time.monotonic
    )
    variants = _variants(metrics)

    # Warm up both variants (label children, caches) and check the writes.
    for variant in variants.values():
        _use(metrics, variant)
        _pass(hub, events[:4], metrics)
    if len(writes) != 8 * args.sockets or not writes[0].startswith(b"\x81"):
        raise RuntimeError(f"{len(writes)} writes for 8 events to {args.sockets}")
    for socket in sockets:
        socket.wire.transport.socket.send = len

    # What set-up left (Django, the hub, the events) out of the collector's
    # way: each pass starts from the same collector state, and its collections
    # scan only what the pass itself allocated.
    gc.collect()
    gc.freeze()
    order = ["counters", "no-op", "counters", "no-op"]
    seconds = []
    for name in order:
        _use(metrics, variants[name])
        gc.collect()
        if args.child == "callgrind":
            # Collected and dumped by callgrind: this call only.
            sys.call_tracing(_pass, (hub, events, metrics))
        else:
            best = float("inf")
            for _ in range(args.timing_rounds):
                gc.collect()
                start = time.process_time()
                _pass(hub, events, metrics)
                best = min(best, time.process_time() - start)
            seconds.append(best)
    if args.child == "callgrind":
        _use(metrics, variants["no-op"])
        for name, loop in (("stub calls", _stub_calls), ("empty loop", _empty)):
            gc.collect()
            sys.call_tracing(loop, (events, metrics))
            order.append(name)
    _use(metrics, variants["counters"])
    json.dump({"order": order, "seconds": seconds}, sys.stdout)


# --- the parent: run the children, work out the figures -------------------------


def _run_child(mode, args, prefix=()):
    command = [
        *prefix,
        sys.executable,
        "-m",
        "bench.metricscost",
        "--child",
        mode,
        "--sockets",
        str(args.sockets),
        "--events",
        str(args.events),
        "--timing-rounds",
        str(args.timing_rounds),
    ]
    done = subprocess.run(
        command, env=_child_env(), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {mode} child failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _callgrind(args):
    """Instructions of each pass, from a child under callgrind."""
    with tempfile.TemporaryDirectory(prefix="metricscost-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        prefix = [
            "valgrind",
            "--tool=callgrind",
            "--collect-atstart=no",
            "--toggle-collect=sys_call_tracing",
            "--dump-after=sys_call_tracing",
            f"--callgrind-out-file={out}",
        ]
        info = _run_child("callgrind", args, prefix)
        dumps = sorted(
            glob.glob(out + ".*"), key=lambda path: int(path.rsplit(".", 1)[1])
        )
        counts = []
        for path in dumps:
            with open(path) as dump:
                for line in dump:
                    if line.startswith("summary:"):
                        counts.append(int(line.split()[1]))
                        break
    if len(counts) != len(info["order"]):
        raise SystemExit(f"{len(counts)} callgrind dumps for {len(info['order'])}")
    return info["order"], counts


def _figures(order, counts, deliveries):
    """Per-delivery instructions of one callgrind run's passes."""
    passes = [
        {"variant": name, "instructions": count, "per_delivery": count / deliveries}
        for name, count in zip(order, counts, strict=True)
    ]

    def mean_and_spread(name):
        values = [p["per_delivery"] for p in passes if p["variant"] == name]
        return sum(values) / len(values), max(values) - min(values)

    with_counters, spread_on = mean_and_spread("counters")
    without, spread_off = mean_and_spread("no-op")
    (stubs,) = (p["per_delivery"] for p in passes if p["variant"] == "stub calls")
    (empty,) = (p["per_delivery"] for p in passes if p["variant"] == "empty loop")
    calls = stubs - empty
    return {
        "passes": passes,
        "with_counters": with_counters,
        "without_counters": without,
        "counters_minus_stubs": with_counters - without,
        "stub_calls": calls,
        "counters": with_counters - without + calls,
        "spread_between_passes": [spread_on, spread_off],
    }


def measure(args) -> dict:
    deliveries = args.events * args.sockets
    runs = []
    for run in range(args.runs):
        print(f"callgrind run {run + 1} of {args.runs}...", file=sys.stderr)
        runs.append(_figures(*_callgrind(args), deliveries))
    print("native timing...", file=sys.stderr)
    timing = _run_child("native", args)

    first = runs[0]
    with_counters = first["with_counters"]
    counter = first["counters"]
    per_run = [run["counters"] for run in runs]

    # Instructions per µs of this workload on this machine, natively.
    timed = first["passes"][: len(timing["seconds"])]
    instructions = sum(p["instructions"] for p in timed)
    seconds = sum(timing["seconds"])
    per_us = instructions / (seconds * 1e6)
    counter_us = counter / per_us
    real_instructions = REAL_US_PER_DELIVERY * per_us
    hub_share = counter / with_counters
    real_share = counter / real_instructions

    return {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": _commit(),
            "python": platform.python_version(),
            "valgrind": _valgrind_version(),
            "command": "python -m bench.metricscost",
        },
        "workload": {
            "sockets": args.sockets,
            "events": args.events,
            "deliveries_per_pass": deliveries,
            "frame": "message, 100-character body, JSON framing, via publish_many",
            "observed_delivery_s": DELAY_S,
            "sending_side_counted_per_event": [
                "frame_in('send')",
                "frames_out_add('ack')",
                "messages_stored.inc()",
            ],
        },
        "runs": [
            {
                "passes": run["passes"],
                "with_counters": round(run["with_counters"], 2),
                "without_counters": round(run["without_counters"], 2),
                "counters_minus_stubs": round(run["counters_minus_stubs"], 2),
                "stub_calls": round(run["stub_calls"], 3),
                "counters": round(run["counters"], 2),
                "spread_between_passes": [
                    round(x, 3) for x in run["spread_between_passes"]
                ],
            }
            for run in runs
        ],
        "instructions_per_delivery": {
            "with_counters": round(with_counters, 2),
            "without_counters": round(first["without_counters"], 2),
            "counters_minus_stubs": round(first["counters_minus_stubs"], 2),
            "stub_calls": round(first["stub_calls"], 3),
            "counters": round(counter, 2),
            "counters_per_event": round(counter * args.sockets, 1),
            "counters_spread_between_runs": round(max(per_run) - min(per_run), 3),
            "counters_share_of_hub_workload": round(hub_share, 5),
        },
        "conversion": {
            "native_seconds_per_pass": timing["seconds"],
            "timing_rounds": args.timing_rounds,
            "instructions_per_us": round(per_us, 1),
            "hub_us_per_delivery": round(with_counters / per_us, 3),
            "counters_us_per_delivery": round(counter_us, 4),
        },
        "against_the_real_server": {
            "server_us_per_delivery": REAL_US_PER_DELIVERY,
            "server_instructions_per_delivery_estimate": round(real_instructions),
            "counters_share": round(real_share, 5),
            "bound": BOUND_SHARE,
            "under_bound": hub_share < BOUND_SHARE and real_share < BOUND_SHARE,
        },
    }


def _commit():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _valgrind_version():
    done = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    return done.stdout.strip()


def report(result) -> str:
    i = result["instructions_per_delivery"]
    c = result["conversion"]
    r = result["against_the_real_server"]
    w = result["workload"]
    lines = [
        f"{w['events']} broadcasts to {w['sockets']} sockets per pass "
        "(callgrind, instructions):",
    ]
    for number, run in enumerate(result["runs"], 1):
        for p in run["passes"]:
            lines.append(
                f"  run {number}  {p['variant']:<9} {p['instructions']:>13,}  "
                f"{p['per_delivery']:9.2f} per delivery"
            )
        lines.append(f"  run {number}  counters {run['counters']:.2f} per delivery")
    lines += [
        f"per delivery (run 1): {i['with_counters']:.2f} with counters, "
        f"{i['without_counters']:.2f} without, + {i['stub_calls']:.2f} for the "
        f"stub calls: counters {i['counters']:.2f} "
        f"({i['counters_per_event']:.0f} per broadcast, runs differ by "
        f"{i['counters_spread_between_runs']:.2f}), "
        f"{i['counters_share_of_hub_workload']:.3%} of the hub-only workload",
        f"at {c['instructions_per_us']:.0f} instructions/µs (measured natively): "
        f"hub {c['hub_us_per_delivery']:.2f} µs, counters "
        f"{c['counters_us_per_delivery']:.4f} µs per delivery",
        f"against the benchmark's {r['server_us_per_delivery']} µs per delivery "
        f"(~{r['server_instructions_per_delivery_estimate']:,} instructions): "
        f"counters {r['counters_share']:.3%}; bound {r['bound']:.0%}: "
        + ("under" if r["under_bound"] else "NOT under"),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--timing-rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=2, help="callgrind runs")
    parser.add_argument("--output", help="write the JSON here too")
    parser.add_argument(
        "--child", choices=("callgrind", "native"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed (apt-get install valgrind)")
    result = measure(args)
    print(report(result), file=sys.stderr)
    text = json.dumps(result, indent=2) + "\n"
    if args.output:
        with open(args.output, "w") as out:
            out.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
