"""``python manage.py chat_client --url ws://host/ws/ --token KEY ROOM``.

A terminal chat session in one room through ``chat.client.ChatClient``: the
room's recent history, then live messages and presence above a prompt
(prompt_toolkit), reconnecting on its own and catching up with ``since``. Type
a line to send it; ``/quit``, Ctrl-D or Ctrl-C to leave.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.client import ChatClient, ChatClosed

HISTORY_SHOWN = 20


def message_line(message: dict[str, Any]) -> str:
    """``[HH:MM] alice: body`` (UTC, as the server stamps it)."""
    at = str(message.get("created_at") or "")[11:16]
    return f"[{at}] {message['user']['username']}: {message['body']}"


class Session:
    """One room on one client: what to print for what comes in."""

    def __init__(
        self, client: ChatClient, room: str, write: Callable[[str], None]
    ) -> None:
        self.client = client
        self.room = room
        self.write = write
        self.seen: set[int] = set()  # seqs printed: a replay prints nothing twice
        self.losses_shown = 0  # sockets lost that the terminal has said so of

    def show_message(self, message: dict[str, Any]) -> None:
        seq = message.get("seq")
        if message.get("room") != self.room or seq in self.seen:
            return
        if isinstance(seq, int):
            self.seen.add(seq)
        if message.get("deleted"):
            return
        self.write(message_line(message))

    def show_event(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "message":
            self.show_message(frame)
        elif kind == "joined" and frame.get("room") == self.room:
            # The client's own rejoin after a reconnect: it comes before what
            # was missed, so the terminal says so in that order.
            self.show_lost()
            self.write("* reconnected")
        elif kind == "presence" and frame.get("room") == self.room:
            self.write(f"* {frame['user']} is {frame['status']}")
        elif kind == "presence_batch" and frame.get("room") == self.room:
            self.write(f"* {frame['online_count']} online")
        elif kind == "error":
            self.write(f"! {frame.get('code')}: {frame.get('message')}")
        elif kind == "removed" and frame.get("room") == self.room:
            self.write(f"! removed from #{self.room}: {frame.get('reason', '')}")

    async def start(self) -> None:
        joined = await self.client.join(self.room)
        if joined["type"] == "error":
            raise CommandError(f"{joined['code']}: {joined['message']}")
        online = ", ".join(joined["online"])
        self.write(f"joined #{self.room}: {joined['online_count']} online: {online}")
        page = await self.client.request(
            {"type": "history", "room": self.room, "limit": HISTORY_SHOWN}
        )
        for message in page.get("messages", []):
            self.show_message(message)

    async def follow(self) -> None:
        while True:
            self.show_event(await self.client.events.get())

    def show_lost(self) -> None:
        if len(self.client.closes) > self.losses_shown:
            self.losses_shown = len(self.client.closes)
            self.write("* connection lost; reconnecting…")

    async def watch_connection(self) -> None:
        # Socket ends counted, not sampled: a reconnect within one poll still
        # shows; "reconnected" comes with the rejoin (show_event).
        while True:
            await wait_until(lambda: len(self.client.closes) > self.losses_shown)
            self.show_lost()

    async def say(self, line: str) -> None:
        ack = await self.client.send_message(self.room, line)
        if ack["type"] == "error":
            self.write(f"! {ack['code']}: {ack['message']}")


async def wait_until(condition: Callable[[], bool], interval: float = 0.2) -> None:
    while not condition():
        await asyncio.sleep(interval)


class Command(BaseCommand):
    help = "Chat in a room from the terminal (history, live messages, reconnect)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("room")
        parser.add_argument(
            "--url",
            action="append",
            required=True,
            help="The server's WebSocket URL (ws://host/ws/); repeat to fail over.",
        )
        parser.add_argument("--token", required=True, help="An API token's key.")
        parser.add_argument(
            "--binary", action="store_true", help="Speak chat.v1.bin framing."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            asyncio.run(self.session(options))
        except (KeyboardInterrupt, EOFError):
            pass

    async def session(self, options: dict[str, Any]) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        client = ChatClient(
            options["url"], token=options["token"], binary=options["binary"]
        )
        try:
            await client.connect()
        except Exception as exc:
            raise CommandError(f"could not connect: {exc}") from None
        user = (client.hello or {}).get("user", {}).get("username")
        room = options["room"]
        prompt: PromptSession[str] = PromptSession(f"#{room}> ")
        with patch_stdout(raw=True):
            session = Session(client, room, print)
            print(f"connected as {user}")
            tasks = []
            try:
                await session.start()
                loop = asyncio.get_running_loop()
                tasks = [
                    loop.create_task(session.follow()),
                    loop.create_task(session.watch_connection()),
                ]
                while True:
                    line = await prompt.prompt_async()
                    if line.strip() == "/quit":
                        break
                    if line.strip():
                        # Not awaited: the prompt stays free while an ack waits
                        # (through a reconnect, say); sends go out in order.
                        tasks.append(loop.create_task(session.say(line)))
            except (KeyboardInterrupt, EOFError):
                pass
            except ChatClosed as closed:
                print(f"! {closed}")
            finally:
                for task in tasks:
                    task.cancel()
                await client.close()
