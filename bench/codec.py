"""Per-frame cost of the wire codec: parse of client frames, encode of server frames.

    python -m bench.codec            # chat.protocol as it is now

Each figure is the best of five runs of a tight loop, in microseconds per frame,
on one core of this machine; no server, no socket, only ``chat.protocol``.
"""

import importlib
import json
import struct
import sys
import timeit
from datetime import UTC, datetime

BODY = "x" * 100


class _Author:
    pk = 7

    def get_username(self):
        return "alice"


class _Message:
    pk = 1234
    seq = 99
    body = BODY
    client_msg_id = "c-0001"
    created_at = datetime(2026, 12, 2, 12, 0, 0, 123000, tzinfo=UTC)
    edited_at = None
    deleted_at = None


INBOUND = {
    "send": {
        "type": "send",
        "room": "lobby",
        "body": BODY,
        "client_msg_id": "c-0001",
        "ref": "r1",
    },
    "join": {"type": "join", "room": "lobby", "since": 120, "ref": "j1"},
    "ping": {"type": "ping", "ref": "p1"},
}


def _best(statement, number):
    return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e6


def measure(protocol):
    figures = {}
    for name, frame in INBOUND.items():
        text = json.dumps(frame)
        code = struct.pack(">I", protocol.FRAME_CODES[name])
        body = {k: v for k, v in frame.items() if k != "type"}
        binary = code + json.dumps(body).encode()
        figures[f"parse {name} (JSON)"] = _best(
            lambda text=text: protocol.parse_json(text), 20_000
        )
        figures[f"parse {name} (binary)"] = _best(
            lambda binary=binary: protocol.parse_binary(binary), 20_000
        )
    author, message = _Author(), _Message()

    def build_message():
        return protocol.message(protocol.message_payload(message, "lobby", author))

    def build_page():
        payloads = [protocol.message_payload(message, "lobby", author)] * 50
        return protocol.history(
            room_slug="lobby", messages=payloads, has_more=True, ref="h"
        )

    figures["build+encode message"] = _best(
        lambda: protocol.encode(build_message()).text, 20_000
    )
    figures["build+encode message, binary"] = _best(
        lambda: protocol.encode(build_message()).binary, 20_000
    )
    figures["build+encode ack"] = _best(
        lambda: (
            protocol.encode(
                protocol.ack(ref="r1", room_slug="lobby", message=message)
            ).text
        ),
        20_000,
    )
    figures["build+encode history of 50"] = _best(
        lambda: protocol.encode(build_page()).text, 2_000
    )
    figures.update(measure_gzip(protocol, author))
    return figures


WORDS = (
    "the a deploy room message fix review tomorrow lunch build test green red "
    "merge branch ticket customer release notes meeting moved to 3pm thanks "
    "can you look at this link please done ok sounds good why failed again"
).split()


def _sentence(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))


def measure_gzip(protocol, author):
    """``?compress=gzip``: bytes and CPU for a history page and a fan-out frame.

    The page holds 50 messages with varied chat-like bodies (4 to 30 words,
    seeded), not one body repeated, so the ratio is not flattered.
    """
    import random

    rng = random.Random(50)
    payloads = []
    for n in range(50):
        message = _Message()
        message.pk, message.seq = 5000 + n, 100 + n
        message.body = _sentence(rng)
        message.client_msg_id = f"c-{rng.getrandbits(48):012x}"
        payloads.append(protocol.message_payload(message, "lobby", author))
    page = protocol.encode(
        protocol.history(room_slug="lobby", messages=payloads, has_more=True, ref="h")
    )
    plain = len(page.text.encode())
    zipped, _ = page.wire(protocol.FRAMING_JSON_GZIP)
    one = protocol.encode(protocol.message(payloads[0]))
    return {
        "gzip history of 50: bytes plain": plain,
        "gzip history of 50: bytes gzipped": len(zipped),
        "gzip history of 50: compress once": _best(
            lambda: protocol.Encoded(page.type, page.text).wire(
                protocol.FRAMING_JSON_GZIP
            ),
            500,
        ),
        "gzip fan-out message: bytes plain": len(one.text.encode()),
        "gzip fan-out message: bytes sent": len(
            one.wire(protocol.FRAMING_JSON_GZIP)[0]
        ),
    }


def main(argv):
    module = argv[1] if len(argv) > 1 else "chat.protocol"
    figures = measure(importlib.import_module(module))
    width = max(map(len, figures))
    for name, value in figures.items():
        unit = "bytes" if "bytes" in name else "µs"
        print(f"{name:<{width}}  {value:8.2f} {unit}")


if __name__ == "__main__":
    main(sys.argv)
