from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat import push, selectors
from chat.protocol import ChatError

if TYPE_CHECKING:
    from django.contrib.auth.models import User


class Command(BaseCommand):
    help = "Push an event to live connections: of a user, in a room, or all."

    def add_arguments(self, parser: CommandParser) -> None:
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--user", help="username")
        target.add_argument("--room", help="room slug")
        target.add_argument("--all", action="store_true", help="every connection")
        parser.add_argument("event")
        parser.add_argument("data", help="JSON")

    def handle(
        self,
        *args: Any,
        user: str | None,
        room: str | None,
        all: bool,
        event: str,
        data: str,
        **options: Any,
    ) -> None:
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise CommandError(f"DATA is not valid JSON: {exc}") from None
        try:
            if user:
                count = push.to_user(self._user(user), event, payload)
            elif room:
                count = push.to_room(room, event, payload)
            else:
                count = push.to_everyone(event, payload)
        except ChatError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"Reached {count} connection(s).")

    def _user(self, username: str) -> User:
        try:
            return selectors.user_get_active(username=username)
        except ChatError:
            raise CommandError(f"No user named {username!r}.") from None
