"""Rooms, memberships, messages and API tokens."""

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Self, TypeVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, models
from django.utils import timezone


def model_column(model: type[models.Model], name: str) -> str:
    """The database column of field ``name`` of ``model``."""
    field = model._meta.get_field(name)
    assert isinstance(field, models.Field) and field.column
    return field.column


class Room(models.Model):
    # Direct conversations own the slugs ``dm-<low user id>-<high user id>``.
    DIRECT_SLUG_PREFIX = "dm-"
    DIRECT_SLUG_MESSAGE = "Slugs starting with “dm-” are kept for direct conversations."

    slug = models.SlugField(max_length=64, unique=True)
    title = models.CharField(max_length=200)
    is_private = models.BooleanField(
        default=False, help_text="Only members may read and join a private room."
    )
    is_direct = models.BooleanField(
        default=False, editable=False, help_text="A direct conversation of two users."
    )
    is_closed = models.BooleanField(
        default=False, help_text="A closed room stays readable but takes no messages."
    )
    # The seq of the newest stored message; bumped in the transaction that
    # stores the next one, which is what keeps seq gapless.
    last_seq = models.PositiveBigIntegerField(default=0, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["slug"]
        permissions = [("push_message", "Can push events to live connections")]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        if not self.is_direct and self.slug.lower().startswith(self.DIRECT_SLUG_PREFIX):
            raise ValidationError({"slug": self.DIRECT_SLUG_MESSAGE})


class Membership(models.Model):
    class Role(models.TextChoices):
        MEMBER = "member", "Member"
        MODERATOR = "moderator", "Moderator"

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="chat_memberships",
    )
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    read_seq = models.PositiveBigIntegerField(
        default=0, help_text="The highest seq this user has read in the room."
    )
    # What the unread count needs without counting the room's history: unread =
    # room.last_seq - read_seq - uncounted_after_read. Both counters are moved in
    # the transaction that stores or deletes a message or moves the marker.
    uncounted_after_read = models.PositiveBigIntegerField(
        default=0,
        editable=False,
        help_text="Messages after the read marker that are not unread: the user's"
        " own, or deleted.",
    )
    unread_mentions = models.PositiveBigIntegerField(
        default=0,
        editable=False,
        help_text="Unread messages (after the read marker) that mention the user.",
    )
    joined_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["room", "user"], name="membership_unique")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.room} ({self.role})"


class Message(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    seq = models.PositiveBigIntegerField()
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_messages"
    )
    body = models.TextField(max_length=4000)
    client_msg_id = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    edited_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)
    # The usernames the body mentioned when it was stored (rows in Mention too).
    mention_names = models.JSONField(default=list, blank=True, editable=False)
    reply_to = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="replies",
        editable=False,
        help_text="The message this one replies to (the thread's first message).",
    )
    reply_count = models.PositiveIntegerField(default=0, editable=False)
    # The reactions as message objects carry them ([{"emoji", "count", "users"}],
    # in order of first use), rebuilt from Reaction rows at every change, so
    # that no page of messages needs a query for them.
    reaction_summary = models.JSONField(default=list, blank=True, editable=False)
    # Its attachments as message objects carry them, fixed when it is stored.
    attachment_summary = models.JSONField(default=list, blank=True, editable=False)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(
                fields=["room", "seq"], name="message_room_seq_unique"
            ),
            models.UniqueConstraint(
                fields=["author", "client_msg_id"], name="message_client_msg_id_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.room}#{self.seq}"

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None


class Mention(models.Model):
    """A user that a message's body mentions (``@username``), kept for counting."""

    message = models.ForeignKey(
        Message, on_delete=models.CASCADE, related_name="mentions"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    # The message's room and seq, so that "mentions of me after my marker" is
    # one range of an index.
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="+")
    seq = models.PositiveBigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["message", "user"], name="mention_message_user_unique"
            )
        ]
        indexes = [
            models.Index(fields=["user", "room", "seq"], name="mention_user_room_seq")
        ]

    def __str__(self) -> str:
        return f"@{self.user} in {self.message}"


class Reaction(models.Model):
    """One user's emoji on one message; reacting twice is still one reaction."""

    message = models.ForeignKey(
        Message, on_delete=models.CASCADE, related_name="reactions"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    emoji = models.CharField(max_length=16)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["message", "user", "emoji"], name="reaction_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.emoji} by {self.user} on {self.message}"


def upload_path(upload: "Upload", filename: str) -> str:
    """Where an upload's file goes in storage: a random name, not the user's."""
    return f"chat/uploads/{timezone.now():%Y/%m}/{secrets.token_hex(16)}"


class Upload(models.Model):
    """A file a user uploaded (``POST /api/uploads``), attached to at most one
    message. One never attached is removed by ``manage.py chat_uploads_clean``."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    file = models.FileField(upload_to=upload_path, max_length=200)
    name = models.CharField(max_length=200, help_text="The file's name, as uploaded.")
    size = models.PositiveBigIntegerField()
    content_type = models.CharField(
        max_length=100, help_text="Read from the file's first bytes, not the upload."
    )
    message = models.ForeignKey(
        Message,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="attachments",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    def __str__(self) -> str:
        return f"{self.name} ({self.size} bytes)"


class ApiTokenQuerySet(models.QuerySet["ApiToken"]):
    def active(self) -> Self:
        return self.filter(revoked_at__isnull=True, user__is_active=True)


class ApiToken(models.Model):
    """A bearer token for non-browser clients; only its SHA-256 is stored."""

    PREFIX = "cs_"
    # last_used_at is kept to the minute: one write a minute, not one per use.
    USE_RESOLUTION = timedelta(minutes=1)

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_tokens"
    )
    name = models.CharField(max_length=100, blank=True)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    hint = models.CharField(
        max_length=12,
        editable=False,
        help_text="The first characters, to tell tokens apart.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.hint}… ({self.user})"

    @staticmethod
    def hash_key(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    @classmethod
    def new_key(cls) -> str:
        return cls.PREFIX + secrets.token_urlsafe(32)

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @staticmethod
    def key_from_authorization(value: str) -> str:
        """The key of an ``Authorization: Bearer <key>`` value; "" for any other."""
        scheme, _, key = value.partition(" ")
        return key.strip() if scheme.lower() == "bearer" else ""


_S = TypeVar("_S", bound="Sanction")


class SanctionQuerySet(models.QuerySet[_S]):
    def active(self, now: datetime | None = None) -> Self:
        """The sanctions in force ``now``."""
        return self.filter(Sanction.in_force_q(now or timezone.now()))


class Sanction(models.Model):
    """What bans and mutes share: who, why, until when, set by whom."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="chat_%(class)ss",
    )
    reason = models.CharField(max_length=200)
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="Leave empty for no end."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = SanctionQuerySet.as_manager()

    class Meta:
        abstract = True
        ordering = ["-created_at"]

    # The one rule of a sanction in force, said three ways: it has no end, or it
    # ends after now. A query filter, a check of a loaded row, and plain SQL for
    # the connect path's raw reads (see chat.selectors).

    @staticmethod
    def in_force_q(now: datetime) -> models.Q:
        return models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)

    @property
    def is_active(self) -> bool:
        return self.expires_at is None or self.expires_at > timezone.now()

    @classmethod
    def in_force_sql(cls, alias: str) -> str:
        """SQL: row ``alias`` is in force at the query parameter that follows."""
        expires = connection.ops.quote_name(model_column(cls, "expires_at"))
        return f"{alias}.{expires} IS NULL OR {alias}.{expires} > %s"


class Ban(Sanction):
    """Keeps a user out of the whole site (no room) or out of one room."""

    room = models.ForeignKey(
        Room,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="bans",
        help_text="Leave empty for a site-wide ban.",
    )

    class Meta(Sanction.Meta):
        pass

    def __str__(self) -> str:
        where = f"room {self.room}" if self.room_id else "site"
        return f"{self.user} banned from {where}"


class Mute(Sanction):
    """Keeps a user from sending in one room; they can still read it."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="mutes")

    class Meta(Sanction.Meta):
        pass

    def __str__(self) -> str:
        return f"{self.user} muted in {self.room}"


class ModerationAction(models.Model):
    """What a moderator did, to whom, where, when and why."""

    class Kind(models.TextChoices):
        BAN = "ban", "Site ban"
        UNBAN = "unban", "Site ban lifted"
        ROOM_BAN = "room_ban", "Room ban"
        ROOM_UNBAN = "room_unban", "Room ban lifted"
        MUTE = "mute", "Mute"
        UNMUTE = "unmute", "Mute lifted"
        MESSAGE_DELETE = "message_delete", "Message deleted"
        ROOM_CLOSE = "room_close", "Room closed"
        ROOM_REOPEN = "room_reopen", "Room reopened"
        TOKEN_REVOKE = "token_revoke", "Token revoked"
        SIGN_OUT = "sign_out", "Signed out everywhere"
        DISCONNECT = "disconnect", "Connection closed"
        MEMBERSHIP_REMOVE = "membership_remove", "Removed from a room"
        DEACTIVATE = "deactivate", "Account deactivated"

    kind = models.CharField(max_length=20, choices=Kind.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    target_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    room = models.ForeignKey(
        Room, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    message = models.ForeignKey(
        Message, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    detail = models.CharField(max_length=200, blank=True)
    reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} by {self.actor or 'the system'}"
