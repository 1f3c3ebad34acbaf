"""Writes: rooms, memberships, messages, tokens. Broadcasts go out after commit."""

from functools import partial

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from chat import fanout, protocol, selectors
from chat.models import ApiToken, Membership, Message, Room
from chat.protocol import BAD_REQUEST, FORBIDDEN, NOT_FOUND, ROOM_CLOSED, ChatError


def _broadcast_on_commit(room, frame, *, exclude_user=None):
    groups = fanout.room_groups(room)
    transaction.on_commit(
        partial(fanout.publish_sync, groups, frame, exclude_user=exclude_user)
    )


def room_create(*, slug, title, is_private=False, creator=None):
    """Create a room; its creator moderates it."""
    if slug.lower().startswith(Room.DIRECT_SLUG_PREFIX):
        raise ChatError(BAD_REQUEST, Room.DIRECT_SLUG_MESSAGE)
    with transaction.atomic():
        room = Room.objects.create(
            slug=slug, title=title, is_private=is_private, created_by=creator
        )
        if creator is not None:
            Membership.objects.create(
                room=room, user=creator, role=Membership.Role.MODERATOR
            )
    return room


def membership_add(*, room, user, role=Membership.Role.MEMBER):
    membership, _ = Membership.objects.get_or_create(
        room=room, user=user, defaults={"role": role}
    )
    return membership


def room_join(*, slug, user):
    """Check ``user`` may enter the room; a public room makes them a member.

    Return the room and the user's read marker.
    """
    room = selectors.room_get_readable(slug=slug, user=user)
    membership = selectors.membership_get(room=room, user=user)
    if membership is None:
        try:
            membership = membership_add(room=room, user=user)
        except IntegrityError:
            membership = selectors.membership_get(room=room, user=user)
    return room, membership.read_seq


def direct_room_get_or_create(*, user, other):
    """The direct conversation of two users (``dm-<low id>-<high id>``)."""
    low, high = sorted([user.pk, other.pk])
    slug = f"{Room.DIRECT_SLUG_PREFIX}{low}-{high}"
    room = Room.objects.filter(slug=slug, is_direct=True).first()
    if room is not None:
        return room
    names = sorted({user.get_username(), other.get_username()})
    try:
        with transaction.atomic():
            room = Room.objects.create(
                slug=slug, title=" & ".join(names), is_private=True, is_direct=True
            )
            for member in {user, other}:
                Membership.objects.create(room=room, user=member)
    except IntegrityError:
        room = Room.objects.get(slug=slug, is_direct=True)
    return room


def message_create(*, room, author, body, client_msg_id):
    """Store a message with the room's next seq and broadcast it after commit.

    A retry (same author and ``client_msg_id``) stores nothing and returns the
    message stored the first time. Return (message, created).
    """
    existing = _message_by_client_id(author=author, client_msg_id=client_msg_id)
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            # The row lock this UPDATE takes serializes writers of one room until
            # commit, so seq has no gap and no duplicate on any number of
            # processes; a closed room matches no row.
            bumped = Room.objects.filter(pk=room.pk, is_closed=False).update(
                last_seq=F("last_seq") + 1
            )
            if not bumped:
                raise ChatError(ROOM_CLOSED, f"room {room.slug!r} is closed")
            seq = Room.objects.values_list("last_seq", flat=True).get(pk=room.pk)
            message = Message.objects.create(
                room=room,
                seq=seq,
                author=author,
                body=body,
                client_msg_id=client_msg_id,
            )
            payload = protocol.message_payload(message, room.slug, author)
            _broadcast_on_commit(room, protocol.message(payload))
    except IntegrityError:
        # A concurrent retry of the same client_msg_id won the race.
        existing = _message_by_client_id(author=author, client_msg_id=client_msg_id)
        if existing is None:
            raise
        return existing, False
    message.room = room
    return message, True


def _message_by_client_id(*, author, client_msg_id):
    return (
        Message.objects.select_related("room")
        .filter(author=author, client_msg_id=client_msg_id)
        .first()
    )


def direct_message_create(*, author, to_username, body, client_msg_id):
    """Send ``body`` to the direct conversation of ``author`` and ``to_username``."""
    existing = _message_by_client_id(author=author, client_msg_id=client_msg_id)
    if existing is not None:
        return existing, False
    other = selectors.user_get_active(username=to_username)
    room = direct_room_get_or_create(user=author, other=other)
    return message_create(
        room=room, author=author, body=body, client_msg_id=client_msg_id
    )


def _message_for_change(*, room, message_id, user):
    message = Message.objects.filter(
        room=room, pk=message_id, deleted_at__isnull=True
    ).first()
    if message is None:
        raise ChatError(NOT_FOUND, f"no message {message_id} in room {room.slug!r}")
    if message.author_id != user.pk and not selectors.user_can_moderate(
        room=room, user=user
    ):
        raise ChatError(FORBIDDEN, "only the author or a moderator may change it")
    return message


def message_edit(*, room, message_id, user, body):
    """Replace a message's body (the author's own, or any as moderator)."""
    with transaction.atomic():
        message = _message_for_change(room=room, message_id=message_id, user=user)
        message.body = body
        message.edited_at = timezone.now()
        message.save(update_fields=["body", "edited_at"])
        frame = protocol.message_edited(room_slug=room.slug, message=message)
        _broadcast_on_commit(room, frame)
    return message


def message_delete(*, room, message_id, user):
    """Delete a message for everyone; it stays in history without its body."""
    with transaction.atomic():
        message = _message_for_change(room=room, message_id=message_id, user=user)
        message.deleted_at = timezone.now()
        message.save(update_fields=["deleted_at"])
        frame = protocol.message_deleted(room_slug=room.slug, message=message)
        _broadcast_on_commit(room, frame)
    return message


def read_marker_set(*, room, user, seq):
    """Move the read marker forward to ``seq``: never back, never past the end."""
    last_seq = Room.objects.values_list("last_seq", flat=True).get(pk=room.pk)
    seq = min(seq, last_seq)
    Membership.objects.filter(room=room, user=user, read_seq__lt=seq).update(
        read_seq=seq
    )
    return seq


def api_token_create(*, user, name=""):
    """Create an API token for ``user``; return it and the key, shown only once."""
    key = ApiToken.new_key()
    token = ApiToken.objects.create(
        user=user, name=name, key_hash=ApiToken.hash_key(key), hint=key[:10]
    )
    return token, key


def api_token_revoke(*, token):
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
    return token
