"""What one server process counts for ``/metrics`` (Prometheus, per process).

prometheus-client keeps the values in this process's default registry, which
also carries its ``process_*`` and ``python_*`` collectors; Prometheus scrapes
each daphne process on its own port. The names and labels are the contract's
("Operations (HTTP)"). Counting stays off the per-socket path: the hub counts
the frames it hands out once per event and frame type (``frames_out_add``),
not once per socket, and a message's delivery time is observed once per event
and process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

connections = Gauge("chat_connections", "Open WebSocket connections of this process")
frames_in = Counter("chat_frames_in", "Client frames received, by type", ["type"])
frames_out = Counter(
    "chat_frames_out", "Server frames handed to sockets, by type", ["type"]
)
messages_stored = Counter(
    "chat_messages_stored", "Messages stored (committed) by this process"
)
delivery_seconds = Histogram(
    "chat_delivery_seconds",
    "From a stored message's broadcast after commit to its write to this "
    "process's sockets",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
errors = Counter("chat_errors", "error frames sent, by code", ["code"])
closes = Counter("chat_closes", "WebSocket connections closed, by close code", ["code"])
rate_limited = Counter("chat_rate_limited", "Client frames refused as rate_limited")

# Label children, bound once per label value (labels() takes a lock each call).
_frames_in: dict[str, Counter] = {}
_frames_out: dict[str, Counter] = {}


def frame_in(frame_type: str) -> None:
    child = _frames_in.get(frame_type)
    if child is None:
        child = _frames_in[frame_type] = frames_in.labels(frame_type)
    child.inc()


def frames_out_add(frame_type: str, count: int = 1) -> None:
    child = _frames_out.get(frame_type)
    if child is None:
        child = _frames_out[frame_type] = frames_out.labels(frame_type)
    child.inc(count)


def error_sent(code: str) -> None:
    errors.labels(code).inc()
    if code == "rate_limited":
        rate_limited.inc()


def closed(code: int | None) -> None:
    closes.labels(str(code if code is not None else 1005)).inc()
