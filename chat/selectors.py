"""Reads: rooms a user may see, history, recovery, token lookup."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.db import connection, models
from django.db.models import Q, QuerySet
from django.utils import timezone

from chat import protocol
from chat.models import ApiToken, Ban, Membership, Message, Mute, Room, model_column
from chat.protocol import FORBIDDEN, NOT_FOUND, ChatError

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


def room_get_readable(*, slug: str, user: User) -> Room:
    """The room, if ``user`` may read it: public or a member, and not banned."""
    return room_access_get(slug=slug, user=user)[0]


def room_access_get(*, slug: str, user: User) -> tuple[Room, int | None]:
    """``(room, read_seq)`` if ``user`` may read the room, in one query.

    ``read_seq`` is None when they are not a member. ``ChatError`` when there is
    no such room, or it is private and they are not a member, or they are banned
    from it.
    """
    room_id, member_user, ban_room, ban_user = (
        _column(Room, "id"),
        _column(Membership, "user"),
        _column(Ban, "room"),
        _column(Ban, "user"),
    )
    rows = Room.objects.raw(
        f"SELECT r.*, m.{_column(Membership, 'read_seq')} AS chat_read_seq,"
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
    is_member = state.pop("chat_membership_id") is not None
    ban_reason = state.pop("chat_ban_reason")
    if room.is_private and not is_member:
        raise ChatError(FORBIDDEN, f"room {slug!r} is private")
    if ban_reason is not None:
        raise ChatError(FORBIDDEN, f"you are banned from {slug!r}: {ban_reason}")
    return room, read_seq if is_member else None


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


def _payloads(room: Room, messages: list[Message]) -> list[protocol.MessageData]:
    return [
        protocol.message_payload(message, room.slug, message.author)
        for message in messages
    ]


def message_history(
    *,
    room: Room,
    before: int | None = None,
    limit: int = protocol.HISTORY_DEFAULT_LIMIT,
) -> tuple[list[protocol.MessageData], bool]:
    """Up to ``limit`` messages before seq ``before``, ascending, and if more exist."""
    query = Message.objects.filter(room=room).select_related("author")
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
