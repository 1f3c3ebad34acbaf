"""Reads: rooms a user may see, history, recovery, token lookup."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, NamedTuple

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.db import connection, models
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from chat import protocol
from chat.models import (
    ApiToken,
    Ban,
    Membership,
    Message,
    Mute,
    Room,
    model_column,
)
from chat.protocol import BAD_REQUEST, FORBIDDEN, NOT_FOUND, ChatError

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# The connect path (handshake, join) reads in plain SQL through Model.objects.raw:
# through the ORM these reads cost 0.2-0.9 ms of Python each, building and
# compiling the queries, against ~15 µs for running the SQL. Table and column
# names come from the models.


def _table(model: type[models.Model]) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _column(model: type[models.Model], name: str) -> str:
    return connection.ops.quote_name(model_column(model, name))


def room_get(*, slug: str) -> Room:
    rooms = Room.objects.raw(
        f"SELECT * FROM {_table(Room)} WHERE {_column(Room, 'slug')} = %s", [slug]
    )
    for room in rooms:
        return room
    raise ChatError(NOT_FOUND, f"no room {slug!r}")


room_get_async = database_sync_to_async(room_get)


def room_get_by_id(room_id: int) -> Room | None:
    return Room.objects.filter(pk=room_id).first()


room_get_by_id_async = database_sync_to_async(room_get_by_id)


def membership_get(*, room: Room, user: User) -> Membership | None:
    return Membership.objects.filter(room=room, user=user).first()


class ReadState(NamedTuple):
    """Where a member is in a room: the read marker; the messages after it that
    are not unread (own or deleted); the unread ones that mention the member."""

    read_seq: int
    uncounted: int
    mentions: int

    def unread(self, last_seq: int) -> int:
        """Unread messages when the room's newest seq is ``last_seq``."""
        return max(last_seq - self.read_seq - self.uncounted, 0)


def read_state(membership: Membership) -> ReadState:
    """A membership's read state, from its counters (no count of messages)."""
    return ReadState(
        membership.read_seq,
        membership.uncounted_after_read,
        membership.unread_mentions,
    )


class RoomHidden(ChatError):
    """A private room ``user`` is not a member of: ``forbidden`` on the wire; the
    site's pages and HTTP API answer it as they answer a room that is not there."""


class RoomBanned(ChatError):
    """``user`` is banned from a room they could otherwise read; ``ban`` says why
    and until when (``forbidden`` on the wire)."""

    def __init__(self, *, room: Room, ban: Ban) -> None:
        super().__init__(FORBIDDEN, f"you are banned from {room.slug!r}: {ban.reason}")
        self.room = room
        self.ban = ban


def _longest_first(bans: QuerySet[Ban]) -> QuerySet[Ban]:
    """Bans in force, the one that lasts longest first (no end before any end)."""
    return bans.order_by(F("expires_at").desc(nulls_first=True), "-pk")


def room_get_readable(*, slug: str, user: User) -> Room:
    """The room, if ``user`` may read it: public or a member, and not banned."""
    return room_access_get(slug=slug, user=user)[0]


def room_access_get(*, slug: str, user: User) -> tuple[Room, ReadState | None]:
    """``(room, read state)`` if ``user`` may read the room, in one query.

    The read state is None when they are not a member. ``ChatError`` when there
    is no such room (``not_found``), ``RoomHidden`` when it is private and they
    are not a member, ``RoomBanned`` when they are banned from it.
    """
    room_id, member_user, ban_room, ban_user = (
        _column(Room, "id"),
        _column(Membership, "user"),
        _column(Ban, "room"),
        _column(Ban, "user"),
    )
    rows = Room.objects.raw(
        f"SELECT r.*, m.{_column(Membership, 'read_seq')} AS chat_read_seq,"
        f" m.{_column(Membership, 'uncounted_after_read')} AS chat_uncounted,"
        f" m.{_column(Membership, 'unread_mentions')} AS chat_mentions,"
        f" m.{_column(Membership, 'id')} AS chat_membership_id,"
        f" (SELECT b.{_column(Ban, 'reason')} FROM {_table(Ban)} b"
        f"  WHERE b.{ban_room} = r.{room_id} AND b.{ban_user} = %s"
        f"  AND ({Ban.in_force_sql('b')}) LIMIT 1) AS chat_ban_reason"
        f" FROM {_table(Room)} r LEFT JOIN {_table(Membership)} m"
        f" ON m.{_column(Membership, 'room')} = r.{room_id} AND m.{member_user} = %s"
        f" WHERE r.{_column(Room, 'slug')} = %s",
        [user.pk, timezone.now(), user.pk, slug],
    )
    room = next(iter(rows), None)
    if room is None:
        raise ChatError(NOT_FOUND, f"no room {slug!r}")
    state = vars(room)
    read_seq = state.pop("chat_read_seq")
    uncounted = state.pop("chat_uncounted")
    mentions = state.pop("chat_mentions")
    is_member = state.pop("chat_membership_id") is not None
    ban_reason = state.pop("chat_ban_reason")
    if room.is_private and not is_member:
        raise RoomHidden(FORBIDDEN, f"room {slug!r} is private")
    if ban_reason is not None:
        # Only a banned user reads again, for the ban's end. None: it ended or was
        # lifted between the two reads, and the room is theirs to read.
        ban = _longest_first(Ban.objects.active().filter(room=room, user=user)).first()
        if ban is not None:
            raise RoomBanned(room=room, ban=ban)
    if not is_member:
        return room, None
    return room, ReadState(read_seq, uncounted, mentions)


def _site_ban_exists(user_id_sql: str) -> str:
    """SQL: a site-wide ban of user ``user_id_sql`` is in force (parameter: now)."""
    return (
        f"EXISTS (SELECT 1 FROM {_table(Ban)} b"
        f" WHERE b.{_column(Ban, 'user')} = {user_id_sql}"
        f" AND b.{_column(Ban, 'room')} IS NULL AND ({Ban.in_force_sql('b')}))"
    )


def user_is_site_banned(*, user_id: int) -> bool:
    """Whether a site-wide ban of the user is in force."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {_site_ban_exists('%s')}", [user_id, timezone.now()])
        return bool(cursor.fetchone()[0])


def site_ban_get(*, user_id: int) -> Ban | None:
    """The site-wide ban of the user in force that lasts longest, or None."""
    bans = Ban.objects.active().filter(user_id=user_id, room__isnull=True)
    return _longest_first(bans).first()


def user_can_invite(*, room: Room, user: User) -> bool:
    """Whether ``user`` may add members to ``room``: a private room, not a direct
    conversation, and they created it, moderate it or are staff."""
    if not room.is_private or room.is_direct:
        return False
    if user.is_staff or (
        room.created_by_id is not None and room.created_by_id == user.pk
    ):
        return True
    return Membership.objects.filter(
        room=room, user=user, role=Membership.Role.MODERATOR
    ).exists()


def mute_get_active(*, room: Room, user: User) -> Mute | None:
    return Mute.objects.active().filter(room=room, user=user).first()


def mutes_active_for(*, pairs: set[tuple[int, int]]) -> dict[tuple[int, int], Mute]:
    """Active mutes among (room_id, user_id) pairs, keyed by the pair."""
    if not pairs:
        return {}
    mutes = Mute.objects.active().filter(
        room_id__in={room_id for room_id, _ in pairs},
        user_id__in={user_id for _, user_id in pairs},
    )
    return {(m.room_id, m.user_id): m for m in mutes if (m.room_id, m.user_id) in pairs}


def room_list_for_user(*, user: User) -> QuerySet[Room]:
    """Public rooms, and the private rooms and direct conversations of ``user``."""
    return (
        Room.objects.filter(Q(is_private=False) | Q(memberships__user=user))
        .distinct()
        .order_by("is_direct", "slug")
    )


def user_can_moderate(*, room: Room, user: User) -> bool:
    if user.is_superuser:
        return True
    return Membership.objects.filter(
        room=room, user=user, role=Membership.Role.MODERATOR
    ).exists()


def message_payloads(messages: list[Message]) -> list[protocol.MessageData]:
    """Message objects for messages loaded with their ``room`` and ``author``."""
    return [
        protocol.message_payload(message, message.room.slug, message.author)
        for message in messages
    ]


def _payloads(room: Room, messages: list[Message]) -> list[protocol.MessageData]:
    for message in messages:
        message.room = room
    return message_payloads(messages)


def message_history(
    *,
    room: Room,
    before: int | None = None,
    limit: int = protocol.HISTORY_DEFAULT_LIMIT,
    thread: int | None = None,
) -> tuple[list[protocol.MessageData], bool]:
    """Up to ``limit`` messages before seq ``before``, ascending, and if more exist.

    With ``thread`` (a message id of the room), that message's replies only.
    """
    query = Message.objects.filter(room=room).select_related("author")
    if thread is not None:
        if not Message.objects.filter(room=room, pk=thread).exists():
            raise ChatError(NOT_FOUND, f"no message {thread} in room {room.slug!r}")
        query = query.filter(reply_to_id=thread)
    if before is not None:
        query = query.filter(seq__lt=before)
    newest_first = list(query.order_by("-seq")[: limit + 1])
    has_more = len(newest_first) > limit
    messages = list(reversed(newest_first[:limit]))
    return _payloads(room, messages), has_more


def messages_since(
    *, room: Room, since: int
) -> tuple[list[protocol.MessageData], bool]:
    """The messages after seq ``since``, ascending, and whether that is all of them.

    More than ``RECOVERY_MAX_MESSAGES`` missed: the newest ones come back, and
    the client pages further back with ``history``.
    """
    limit = protocol.RECOVERY_MAX_MESSAGES
    query = Message.objects.filter(room=room, seq__gt=since).select_related("author")
    newest_first = list(query.order_by("-seq")[: limit + 1])
    complete = len(newest_first) <= limit
    messages = list(reversed(newest_first[:limit]))
    return _payloads(room, messages), complete


def rooms_of_user(*, user: User) -> list[protocol.RoomEntry]:
    """The rooms ``user`` is a member of and may read, direct ones included,
    with their read state and last message, most recent activity first."""
    memberships = list(
        Membership.objects.filter(user=user)
        .select_related("room")
        .exclude(
            room__in=Ban.objects.active()
            .filter(user=user, room__isnull=False)
            .values("room")
        )
    )
    rooms = {m.room_id: m.room for m in memberships}
    last_messages = list(
        Message.objects.filter(room__memberships__user=user, seq=F("room__last_seq"))
        .filter(room_id__in=rooms)
        .select_related("author")
    )
    for message in last_messages:
        message.room = rooms[message.room_id]
    payloads = {
        payload.room: (payload, message.created_at)
        for payload, message in zip(
            message_payloads(last_messages), last_messages, strict=True
        )
    }

    def activity(membership: Membership) -> tuple[float, int]:
        found = payloads.get(membership.room.slug)
        when = found[1] if found is not None else membership.joined_at
        return (when.timestamp(), membership.room_id)

    entries = []
    for membership in sorted(memberships, key=activity, reverse=True):
        room = membership.room
        state = read_state(membership)
        found = payloads.get(room.slug)
        entries.append(
            protocol.RoomEntry(
                room=room.slug,
                title=room.title,
                is_private=room.is_private,
                is_direct=room.is_direct,
                last_seq=room.last_seq,
                read_seq=state.read_seq,
                unread=state.unread(room.last_seq),
                mentions=state.mentions,
                last_message=found[0] if found is not None else None,
            )
        )
    return entries


# --- search -------------------------------------------------------------------------

# The text search configuration: words as written, lowercased, no stemming and
# no stop words, so that PostgreSQL matches whole words as SQLite's fallback
# does. The GIN index of migration 0006 is over this very expression.
SEARCH_CONFIG = "simple"
_WORD_RE = re.compile(r"\w+")


def search_words(query: str) -> list[str]:
    """The words of a search query, lowercased, each once, in order."""
    return list(dict.fromkeys(word.lower() for word in _WORD_RE.findall(query)))


def _readable_room_ids(user: User) -> QuerySet[Room, Any]:
    """Public rooms and the user's own, less those they are banned from."""
    banned = Ban.objects.active().filter(user=user, room__isnull=False)
    return (
        Room.objects.filter(Q(is_private=False) | Q(memberships__user=user))
        .exclude(pk__in=banned.values("room"))
        .values("pk")
    )


def message_search(
    *,
    user: User,
    query: str,
    room_slug: str | None = None,
    before: int | None = None,
    limit: int = protocol.SEARCH_DEFAULT_LIMIT,
) -> tuple[list[protocol.MessageData], bool]:
    """Messages with every word of ``query``, newest first, from the rooms
    ``user`` may read (or the one ``room_slug`` names); never deleted ones.

    ``before`` (a message id) pages back. PostgreSQL answers from its full-text
    index; SQLite matches each word as a whole word, case-insensitively.
    """
    words = search_words(query)
    if not words:
        raise ChatError(BAD_REQUEST, "search: the query has no words")
    found = Message.objects.filter(deleted_at__isnull=True)
    if room_slug is not None:
        found = found.filter(room=room_get_readable(slug=room_slug, user=user))
    else:
        found = found.filter(room_id__in=_readable_room_ids(user))
    if before is not None:
        found = found.filter(pk__lt=before)
    if connection.vendor == "postgresql":
        from django.contrib.postgres.search import SearchQuery, SearchVector

        found = found.annotate(
            document=SearchVector("body", config=SEARCH_CONFIG)
        ).filter(
            document=SearchQuery(
                " ".join(words), config=SEARCH_CONFIG, search_type="plain"
            )
        )
    else:
        for word in words:
            found = found.filter(body__iregex=rf"\b{re.escape(word)}\b")
    newest_first = list(
        found.select_related("room", "author").order_by("-pk")[: limit + 1]
    )
    return message_payloads(newest_first[:limit]), len(newest_first) > limit


class TokenUser(NamedTuple):
    """The user of an active API token, the token's id, and if its use is stale."""

    user: User
    token_id: int
    use_stale: bool


def token_user_get(*, key: str) -> TokenUser | None:
    """The active user of an active API token, in one query; None if there is none.

    A user who is inactive or banned from the site has no usable token.
    ``use_stale``: the token's ``last_used_at`` is older than its resolution, so
    the caller should record this use (``services.api_token_use_soon``).
    """
    User = get_user_model()
    now = timezone.now()
    user_id = _column(User, "id")
    last_used = _column(ApiToken, "last_used_at")
    rows = User.objects.raw(
        f"SELECT u.*, t.{_column(ApiToken, 'id')} AS chat_token_id,"
        f" (t.{last_used} IS NULL OR t.{last_used} < %s) AS chat_token_stale,"
        f" {_site_ban_exists(f'u.{user_id}')} AS chat_site_banned"
        f" FROM {_table(ApiToken)} t JOIN {_table(User)} u"
        f" ON u.{user_id} = t.{_column(ApiToken, 'user')}"
        f" WHERE t.{_column(ApiToken, 'key_hash')} = %s"
        f" AND t.{_column(ApiToken, 'revoked_at')} IS NULL"
        f" AND u.{_column(User, 'is_active')} = %s",
        [now - ApiToken.USE_RESOLUTION, now, ApiToken.hash_key(key), True],
    )
    user = next(iter(rows), None)
    if user is None:
        return None
    state = vars(user)
    token_id = state.pop("chat_token_id")
    use_stale = bool(state.pop("chat_token_stale"))
    if state.pop("chat_site_banned"):
        return None
    return TokenUser(user, token_id, use_stale)


def user_get_by_token(*, key: str) -> User | None:
    """The active user a raw API token belongs to, or None."""
    found = token_user_get(key=key)
    return found.user if found is not None else None


def user_get_active(*, username: str) -> User:
    User = get_user_model()
    try:
        return User.objects.get(**{User.USERNAME_FIELD: username, "is_active": True})
    except User.DoesNotExist:
        raise ChatError(NOT_FOUND, f"no user {username!r}") from None
