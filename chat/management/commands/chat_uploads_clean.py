from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat import services


class Command(BaseCommand):
    help = (
        "Delete uploads never attached to a message (their files too) once they"
        " are older than --hours (default 24). Run it from cron or a timer."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--hours",
            type=float,
            default=24.0,
            help="How old an unattached upload must be to go (default 24).",
        )

    def handle(self, *args: Any, hours: float, **options: Any) -> None:
        if hours < 0:
            raise CommandError("--hours must be 0 or more.")
        count = services.uploads_unattached_delete(older_than=timedelta(hours=hours))
        self.stdout.write(f"Deleted {count} unattached upload(s).")
