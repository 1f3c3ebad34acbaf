"""Reads: rooms a user may see, history, recovery, token lookup."""

from datetime import timedelta

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.db.models import Q
from django.utils import timezone

from chat import protocol
from chat.models import ApiToken, Ban, Membership, Message, Mute, Room
from chat.protocol import FORBIDDEN, NOT_FOUND, ChatError


def room_get(*, slug):
    try:
        return Room.objects.get(slug=slug)
    except Room.DoesNotExist:
        raise ChatError(NOT_FOUND, f"no room {slug!r}") from None


room_get_async = database_sync_to_async(room_get)


def room_get_by_id(room_id):
    return Room.objects.filter(pk=room_id).first()


room_get_by_id_async = database_sync_to_async(room_get_by_id)


def membership_get(*, room, user):
    return Membership.objects.filter(room=room, user=user).first()


def room_get_readable(*, slug, user):
    """The room, if ``user`` may read it: public or a member, and not banned."""
    room = room_get(slug=slug)
    if room.is_private and membership_get(room=room, user=user) is None:
        raise ChatError(FORBIDDEN, f"room {slug!r} is private")
    ban = Ban.objects.active().filter(room=room, user=user).first()
    if ban is not None:
        raise ChatError(FORBIDDEN, f"you are banned from {slug!r}: {ban.reason}")
    return room


def site_ban_get_active(*, user):
    """The user's current site-wide ban, or None."""
    return Ban.objects.active().filter(user=user, room__isnull=True).first()


def mute_get_active(*, room, user):
    return Mute.objects.active().filter(room=room, user=user).first()


def mutes_active_for(*, pairs):
    """Active mutes among (room_id, user_id) pairs, keyed by the pair."""
    if not pairs:
        return {}
    mutes = Mute.objects.active().filter(
        room_id__in={room_id for room_id, _ in pairs},
        user_id__in={user_id for _, user_id in pairs},
    )
    return {(m.room_id, m.user_id): m for m in mutes if (m.room_id, m.user_id) in pairs}


def room_list_for_user(*, user):
    """Public rooms, and the private rooms and direct conversations of ``user``."""
    return (
        Room.objects.filter(Q(is_private=False) | Q(memberships__user=user))
        .distinct()
        .order_by("is_direct", "slug")
    )


def user_can_moderate(*, room, user):
    if user.is_superuser:
        return True
    return Membership.objects.filter(
        room=room, user=user, role=Membership.Role.MODERATOR
    ).exists()


def _payloads(room, messages):
    return [
        protocol.message_payload(message, room.slug, message.author)
        for message in messages
    ]


def message_history(*, room, before=None, limit=protocol.HISTORY_DEFAULT_LIMIT):
    """Up to ``limit`` messages before seq ``before``, ascending, and if more exist."""
    query = Message.objects.filter(room=room).select_related("author")
    if before is not None:
        query = query.filter(seq__lt=before)
    newest_first = list(query.order_by("-seq")[: limit + 1])
    has_more = len(newest_first) > limit
    messages = list(reversed(newest_first[:limit]))
    return _payloads(room, messages), has_more


def messages_since(*, room, since):
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


TOKEN_USE_RESOLUTION = timedelta(minutes=1)


def token_get_active(*, key):
    """The active API token with raw ``key`` (its user loaded), or None."""
    token = (
        ApiToken.objects.active()
        .select_related("user")
        .filter(key_hash=ApiToken.hash_key(key))
        .first()
    )
    if token is not None:
        now = timezone.now()
        # At most one write a minute per token, not one per handshake.
        if (
            token.last_used_at is None
            or now - token.last_used_at > TOKEN_USE_RESOLUTION
        ):
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


def user_get_by_token(*, key):
    """The active user a raw API token belongs to, or None."""
    token = token_get_active(key=key)
    return token.user if token is not None else None


def user_get_active(*, username):
    User = get_user_model()
    try:
        return User.objects.get(**{User.USERNAME_FIELD: username, "is_active": True})
    except User.DoesNotExist:
        raise ChatError(NOT_FOUND, f"no user {username!r}") from None
