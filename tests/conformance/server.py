"""Daphne serving the echo endpoint, in a process of its own."""

import subprocess
import sys

from tests.ports import wait_for_port
from tests.servers import ROOT, DaphneServer

APPLICATION = "tests.conformance.asgi:application"
# Autobahn's 9.* cases send messages and frames of up to 16 MiB; daphne's
# default limit is 1 MiB for both (the chat's own limit is 64 KiB, checked in
# the consumer).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class EchoServer(DaphneServer):
    """``DaphneServer`` serving the echo endpoint, with room for 16 MiB messages."""

    def __init__(self, *, fast_path: bool):
        super().__init__(
            application=APPLICATION,
            extra_env={"CHAT_FAST_PATH": "1" if fast_path else "0"},
            verbosity=0,
        )

    def start(self):
        # DaphneServer.start, with the message and frame limits.
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
                "--websocket-max-message-size",
                str(MAX_MESSAGE_BYTES),
                "--websocket-max-frame-size",
                str(MAX_MESSAGE_BYTES),
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
