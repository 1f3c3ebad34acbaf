"""Daphne serving the echo endpoint, in a process of its own."""

from tests.servers import DaphneServer

APPLICATION = "tests.conformance.asgi:application"
# Autobahn's 9.* cases send messages and frames of up to 16 MiB; daphne's
# default limit is 1 MiB for both (the chat's own limit is 64 KiB, checked in
# the consumer).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class EchoServer(DaphneServer):
    """``DaphneServer`` serving the echo endpoint, with room for 16 MiB messages."""

    def __init__(self, *, fast_path: bool):
        limits = (
            "--websocket-max-message-size",
            str(MAX_MESSAGE_BYTES),
            "--websocket-max-frame-size",
            str(MAX_MESSAGE_BYTES),
        )
        super().__init__(
            application=APPLICATION,
            extra_env={"CHAT_FAST_PATH": "1" if fast_path else "0"},
            verbosity=0,
            daphne_args=limits,
        )
