"""Writes: rooms, memberships, messages, tokens, moderation; and every event.

Events (a frame for sockets, an order to close a socket or take it out of a
room) leave from here only, declared as ``fanout.Delivery``/``fanout.Batch``
values: ``_emit`` sends them after the transaction commits, ``_emit_now`` at once
for the async services that store nothing (typing, presence, push).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.db import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    transaction,
)
from django.db.models import F, Q
from django.utils import timezone

from chat import (
    fanout,
    mentions,
    metrics,
    presence,
    protocol,
    registry,
    selectors,
    uploads,
)
from chat.loops import BackgroundTask, PerLoop, RoomTasks
from chat.models import (
    ApiToken,
    Ban,
    Membership,
    Mention,
    Message,
    ModerationAction,
    Mute,
    Reaction,
    Room,
    Upload,
    model_column,
)
from chat.protocol import (
    BAD_REQUEST,
    CLOSE_BANNED,
    CLOSE_REPLACED,
    FORBIDDEN,
    MUTED,
    NOT_FOUND,
    ROOM_CLOSED,
    TOO_LARGE,
    ChatError,
)

if TYPE_CHECKING:
    from django.contrib.auth.models import User
    from django.core.files.uploadedfile import UploadedFile

logger = logging.getLogger(__name__)

Kind = ModerationAction.Kind


# --- events: the one way out -------------------------------------------------


@dataclass(frozen=True)
class Emission:
    """The ``on_commit`` callback that sends ``events`` (tests read them here)."""

    events: tuple[fanout.Event, ...]

    def __call__(self) -> None:
        async_to_sync(_emit_now)(*self.events)


def _emit(*events: fanout.Event) -> None:
    """Send ``events`` once the transaction commits; never after a rollback.

    Outside a transaction Django runs the callback at once.
    """
    if events:
        transaction.on_commit(Emission(events))


async def _emit_now(*events: fanout.Event) -> None:
    """Send ``events`` now: for async callers with nothing to commit."""
    for event in events:
        if isinstance(event, fanout.Batch):
            await fanout.publish_many(event.broadcasts)
        elif event.order is not None:
            await fanout.command(event.groups, event.order, match=event.match)
        elif event.frame is not None:
            await fanout.publish(
                event.groups,
                event.frame,
                exclude_user=event.exclude_user,
                match=event.match,
                presence_version=event.presence_version,
            )
        else:
            raise ValueError(f"{event!r} has neither a frame nor an order to send")


def _to_room(
    room: Room, frame: protocol.ServerFrame, *, exclude_user: int | None = None
) -> fanout.Delivery:
    groups = tuple(fanout.room_groups(room))
    return fanout.Delivery(groups, frame=frame, exclude_user=exclude_user)


def _order(
    groups: Iterable[str], order: fanout.Order, *, match: fanout.Match | None = None
) -> fanout.Delivery:
    return fanout.Delivery(tuple(groups), order=order, match=match)


def _close_order(reason: str, *, code: int = CLOSE_BANNED) -> fanout.CloseOrder:
    return {"action": "close", "code": code, "reason": reason}


def _close_sockets(
    user_id: int, reason: str, *, match: fanout.Match | None = None
) -> fanout.Delivery:
    """Close ``user_id``'s sockets (those that fit ``match``) with 4403."""
    return _order([fanout.user_group(user_id)], _close_order(reason), match=match)


def _record(
    kind: ModerationAction.Kind,
    *,
    actor: User | None,
    reason: str = "",
    **targets: object,
) -> ModerationAction:
    return ModerationAction.objects.create(
        kind=kind, actor=actor, reason=reason[:200], **targets
    )


def room_create(
    *, slug: str, title: str, is_private: bool = False, creator: User | None = None
) -> Room:
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


def membership_add(
    *, room: Room, user: User, role: Membership.Role = Membership.Role.MEMBER
) -> Membership:
    """Make ``user`` a member. A new member starts with the room read: what
    was said before they came is history, not unread."""
    last_seq = Room.objects.values_list("last_seq", flat=True).get(pk=room.pk)
    membership, _ = Membership.objects.get_or_create(
        room=room, user=user, defaults={"role": role, "read_seq": last_seq}
    )
    return membership


INVITE_FORBIDDEN = "only the room's owner or a moderator may invite"


def membership_invite(
    *, room: Room, inviter: User, username: str
) -> tuple[Membership, bool]:
    """Add the active user ``username`` to a private room on ``inviter``'s word.

    Return the membership and whether it is new. ``ChatError``: ``bad_request``
    for a public or direct room, ``forbidden`` unless ``inviter`` may invite
    (``selectors.user_can_invite``), ``not_found`` for no such user.
    """
    if room.is_direct:
        raise ChatError(BAD_REQUEST, "a direct conversation has two members")
    if not room.is_private:
        raise ChatError(BAD_REQUEST, "anyone may join a public room")
    if not selectors.user_can_invite(room=room, user=inviter):
        raise ChatError(FORBIDDEN, INVITE_FORBIDDEN)
    invitee = selectors.user_get_active(username=username)
    found = selectors.membership_get(room=room, user=invitee)
    if found is not None:
        return found, False
    return membership_add(room=room, user=invitee), True


def room_join(*, slug: str, user: User) -> tuple[Room, selectors.ReadState]:
    """Check ``user`` may enter the room; a public room makes them a member.

    Return the room and the user's read state there (marker, unread, mentions).
    """
    room, state = selectors.room_access_get(slug=slug, user=user)
    if state is None:
        try:
            membership = membership_add(room=room, user=user)
        except IntegrityError:
            found = selectors.membership_get(room=room, user=user)
            if found is None:
                raise
            membership = found
        state = selectors.read_state(membership)
    return room, state


def direct_room_get_or_create(*, user: User, other: User) -> Room:
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


# What the database raises when it is out of reach (stopped, restarting, the
# network gone), as opposed to refusing one request.
DATABASE_OUTAGE_ERRORS = (OperationalError, InterfaceError)
OUTAGE_RETRY_AFTER = 1.0


def database_outage_error(exc: BaseException) -> ChatError | None:
    """The ``unavailable`` error a client gets for ``exc``, if it is an outage."""
    if not isinstance(exc, DATABASE_OUTAGE_ERRORS):
        return None
    return ChatError(
        protocol.UNAVAILABLE,
        "the database is unavailable: nothing was stored; try again",
        retry_after=OUTAGE_RETRY_AFTER,
    )


@dataclass(frozen=True)
class SendRequest:
    room: Room
    author: User
    body: str
    client_msg_id: str
    reply_to: int | None = None  # the id of a message in the same room
    attachments: tuple[int, ...] = ()  # ids of the author's unattached uploads


# What a send comes to: (message, created), or the ChatError that refused it.
SendResult = tuple[Message, bool] | ChatError


def message_create(
    *,
    room: Room,
    author: User,
    body: str,
    client_msg_id: str,
    reply_to: int | None = None,
    attachments: Sequence[int] = (),
) -> tuple[Message, bool]:
    """Store a message with the room's next seq and broadcast it after commit.

    A retry (same author and ``client_msg_id``) stores nothing and returns the
    message stored the first time. Return (message, created).
    """
    request = SendRequest(
        room, author, body, client_msg_id, reply_to, tuple(attachments)
    )
    [result] = message_create_many(requests=[request])
    if isinstance(result, ChatError):
        raise result
    return result


def message_create_many(*, requests: Sequence[SendRequest]) -> list[SendResult]:
    """Store many sends in one transaction (a group commit).

    Return, per request and in order, (message, created) or the ChatError that
    refused it. Each room's seq stays gapless: the rooms are locked in id order,
    bumped once by the number of their new messages, and the messages inserted
    in one statement. In the same transaction: replies counted on their
    thread's first message, mentions stored, and the read state of the authors
    and the mentioned members moved. Broadcasts go out after commit, one per
    room, and a ``notification`` to each mentioned user.
    """
    # Every slot is filled below, before it is returned (None is only a placeholder).
    results: list[SendResult] = [None] * len(requests)  # type: ignore[list-item]
    try:
        with transaction.atomic():
            fresh = _resolve_retries_and_refusals(requests, results)
            threads = _thread_roots(requests, fresh, results)
            uploads = _uploads_to_attach(requests, fresh, results)
            fresh = [(i, dups) for i, dups in fresh if results[i] is None]
            created = _store_fresh(requests, fresh, results, threads, uploads)
            mentioned = _store_mentions(created) if created else {}
            broadcasts = tuple(
                (tuple(fanout.room_groups(room)), tuple(frames))
                for room, frames in _frames_by_room(created)
            )
            if broadcasts:
                # All rooms' frames in one layer message.
                _emit(fanout.Batch(broadcasts))
            if mentioned:
                _emit(*_mention_notifications(created, mentioned))
        # Out of the transaction: committed (the writer's own transaction is
        # the outermost; under a caller's, counted before that one commits).
        metrics.messages_stored.inc(len(created))
    except IntegrityError:
        if len(requests) == 1:
            # A concurrent retry of the same client_msg_id won the race.
            request = requests[0]
            existing = _message_by_client_id(
                author=request.author, client_msg_id=request.client_msg_id
            )
            if existing is None:
                raise
            return [(existing, False)]
        # Somebody else stored one of these meanwhile: settle them one by one.
        return [message_create_many(requests=[r])[0] for r in requests]
    return results


def _resolve_retries_and_refusals(
    requests: Sequence[SendRequest], results: list[SendResult]
) -> list[tuple[int, list[int]]]:
    """Answer retries and refused sends in ``results``; return the fresh indexes."""
    keys = {(r.author.pk, r.client_msg_id) for r in requests}
    retried = _stored_message_ids(keys)
    stored = (
        {
            (m.author_id, m.client_msg_id): m
            for m in Message.objects.select_related("room").filter(pk__in=retried)
        }
        if retried
        else {}
    )
    muted = selectors.mutes_active_for(
        pairs={(r.room.pk, r.author.pk) for r in requests}
    )
    fresh: list[int] = []
    first_of: dict[tuple[int, str], list[int]] = {}
    for index, request in enumerate(requests):
        key = (request.author.pk, request.client_msg_id)
        if key in stored:
            results[index] = (stored[key], False)
        elif key in first_of:
            first_of[key].append(index)  # the same send twice in one batch
        elif (request.room.pk, request.author.pk) in muted:
            mute = muted[(request.room.pk, request.author.pk)]
            results[index] = _muted_error(request.room, mute)
        else:
            first_of[key] = [index]
            fresh.append(index)
    return [(index, first_of[_key(requests[index])]) for index in fresh]


def _stored_message_ids(keys: set[tuple[int, str]]) -> list[int]:
    """The ids of the messages stored already under these (author id,
    client_msg_id) keys: the retries of a batch, almost always none.

    Plain SQL for the ids alone; the ORM built a query of every column of
    messages and rooms, for nothing in nearly every batch.
    """
    quote = connection.ops.quote_name
    author, client_msg_id = (
        quote(model_column(Message, "author")),
        quote(model_column(Message, "client_msg_id")),
    )
    authors = {user_id for user_id, _ in keys}
    msg_ids = {msg_id for _, msg_id in keys}
    sql = (
        f"SELECT {quote('id')}, {author}, {client_msg_id}"
        f" FROM {quote(Message._meta.db_table)}"
        f" WHERE {author} IN ({', '.join('%s' for _ in authors)})"
        f" AND {client_msg_id} IN ({', '.join('%s' for _ in msg_ids)})"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*authors, *msg_ids])
        rows = cursor.fetchall()
    return [pk for pk, user_id, msg_id in rows if (user_id, msg_id) in keys]


def _key(request: SendRequest) -> tuple[int, str]:
    return (request.author.pk, request.client_msg_id)


def _thread_roots(
    requests: Sequence[SendRequest],
    fresh: list[tuple[int, list[int]]],
    results: list[SendResult],
) -> dict[int, int]:
    """Per fresh request index with a ``reply_to``: its thread's first message.

    A reply to a reply belongs to the first message's thread (threads are one
    level deep). A ``reply_to`` that is not a live message of the same room
    refuses the send with ``not_found`` in ``results``.
    """
    wanted = {r for i, _ in fresh if (r := requests[i].reply_to) is not None}
    if not wanted:
        return {}
    parents = {
        pk: (room_id, root)
        for pk, room_id, root in Message.objects.filter(
            pk__in=wanted, deleted_at__isnull=True
        ).values_list("pk", "room_id", "reply_to_id")
    }
    roots: dict[int, int] = {}
    for index, duplicates in fresh:
        request = requests[index]
        if not request.reply_to:
            continue
        found = parents.get(request.reply_to)
        if found is None or found[0] != request.room.pk:
            error = ChatError(
                NOT_FOUND,
                f"no message {request.reply_to} in room {request.room.slug!r}",
            )
            for i in duplicates:
                results[i] = error
            continue
        roots[index] = found[1] or request.reply_to
    return roots


def _store_fresh(
    requests: Sequence[SendRequest],
    fresh: list[tuple[int, list[int]]],
    results: list[SendResult],
    threads: dict[int, int],
    uploads: dict[int, list[Upload]],
) -> list[Message]:
    room_ids = sorted({requests[index].room.pk for index, _ in fresh})
    # Lock the rooms in id order (no deadlock between two batches); on SQLite
    # the IMMEDIATE transaction already holds the database write lock.
    rooms = {
        room.pk: room
        for room in Room.objects.select_for_update()
        .filter(pk__in=room_ids)
        .order_by("pk")
    }
    next_seq = {pk: room.last_seq for pk, room in rooms.items()}
    messages: list[Message] = []
    owners: list[list[int]] = []
    attached: list[list[Upload]] = []
    for index, duplicates in fresh:
        request = requests[index]
        room = rooms.get(request.room.pk)
        if room is None:  # deleted since the socket joined it
            slug = request.room.slug
            for i in duplicates:
                results[i] = ChatError(NOT_FOUND, f"no room {slug!r}")
            continue
        if room.is_closed:
            for i in duplicates:
                results[i] = ChatError(ROOM_CLOSED, f"room {room.slug!r} is closed")
            continue
        next_seq[room.pk] += 1
        messages.append(
            Message(
                room=room,
                seq=next_seq[room.pk],
                author=request.author,
                body=request.body,
                client_msg_id=request.client_msg_id,
                reply_to_id=threads.get(index),
                attachment_summary=[
                    _attachment_entry(upload) for upload in uploads.get(index, ())
                ],
            )
        )
        owners.append(duplicates)
        attached.append(uploads.get(index, []))
    bumped = {pk: seq for pk, seq in next_seq.items() if seq != rooms[pk].last_seq}
    if bumped:
        _room_last_seqs_set(bumped)
    _messages_insert(messages)
    for message, files in zip(messages, attached, strict=True):
        if files:
            Upload.objects.filter(pk__in=[f.pk for f in files]).update(message=message)
    _own_messages_uncount(messages)
    _replies_count(messages)
    for message, duplicates in zip(messages, owners, strict=True):
        results[duplicates[0]] = (message, True)
        for i in duplicates[1:]:
            results[i] = (message, False)
    return messages


# What a message is inserted with; the other columns start empty (no edit,
# deletion, mentions, reactions or replies yet: NULL, or these values).
_INSERTED = ("room", "seq", "author", "body", "client_msg_id", "created_at")
_INSERTED_EMPTY = {"mention_names": "'[]'", "reaction_summary": "'[]'"}


def _messages_insert(messages: list[Message]) -> None:
    """Insert new messages in one statement and give each its id.

    Plain SQL, like ``_room_last_seqs_set``: ``bulk_create`` compiled and
    adapted all thirteen columns of every row in Python, most of them the same
    empty values, and cost more than the database took to insert them.
    """
    if not messages:
        return
    quote = connection.ops.quote_name
    created_at = Message._meta.get_field("created_at")
    attachments = Message._meta.get_field("attachment_summary")
    columns = [quote(model_column(Message, name)) for name in _INSERTED]
    columns += [quote(model_column(Message, name)) for name in _INSERTED_EMPTY]
    columns += [
        quote(model_column(Message, n))
        for n in ("reply_count", "reply_to", "attachment_summary")
    ]
    empty = ", ".join(_INSERTED_EMPTY.values())
    rows: list[str] = []
    params: list[Any] = []
    for message in messages:
        reply_to = "%s" if message.reply_to_id is not None else "NULL"
        attached = "%s" if message.attachment_summary else "'[]'"
        rows.append(f"(%s, %s, %s, %s, %s, %s, {empty}, 0, {reply_to}, {attached})")
        params += [
            message.room_id,
            message.seq,
            message.author_id,
            message.body,
            message.client_msg_id,
            created_at.get_db_prep_save(message.created_at, connection),
        ]
        if message.reply_to_id is not None:
            params.append(message.reply_to_id)
        if message.attachment_summary:
            value = message.attachment_summary
            params.append(attachments.get_db_prep_save(value, connection))
    room_id, seq = columns[0], columns[1]
    sql = (
        f"INSERT INTO {quote(Message._meta.db_table)} ({', '.join(columns)})"
        f" VALUES {', '.join(rows)} RETURNING {quote('id')}, {room_id}, {seq}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        ids = {(room, number): pk for pk, room, number in cursor.fetchall()}
    for message in messages:
        message.pk = ids[(message.room_id, message.seq)]
        message._state.adding = False
        message._state.db = connection.alias


def _uploads_to_attach(
    requests: Sequence[SendRequest],
    fresh: list[tuple[int, list[int]]],
    results: list[SendResult],
) -> dict[int, list[Upload]]:
    """Per fresh request index, the uploads it attaches, locked, in its order.

    Each must be the author's own and not attached yet (nor twice in the batch);
    otherwise the send is refused with ``not_found``.
    """
    wanted = {pk for i, _ in fresh for pk in requests[i].attachments}
    if not wanted:
        return {}
    found = {
        upload.pk: upload
        for upload in Upload.objects.select_for_update().filter(
            pk__in=wanted, message__isnull=True
        )
    }
    taken: set[int] = set()
    chosen: dict[int, list[Upload]] = {}
    for index, duplicates in fresh:
        request = requests[index]
        ids = list(dict.fromkeys(request.attachments))
        bad = [
            pk
            for pk in ids
            if pk not in found or found[pk].owner_id != request.author.pk or pk in taken
        ]
        if bad:
            error = ChatError(NOT_FOUND, f"no upload {bad[0]} of yours to attach")
            for i in duplicates:
                results[i] = error
            continue
        taken.update(ids)
        if ids:
            chosen[index] = [found[pk] for pk in ids]
    return chosen


def _attachment_entry(upload: Upload) -> dict[str, Any]:
    """An upload as message objects carry it."""
    return {
        "id": upload.pk,
        "name": upload.name,
        "size": upload.size,
        "content_type": upload.content_type,
        "url": upload_url(upload),
    }


def upload_url(upload: Upload) -> str:
    from django.urls import reverse

    return reverse("chat:upload", args=[upload.pk, upload.name])


def _own_messages_uncount(messages: list[Message]) -> None:
    """An author's own messages are never unread to them: count them out.

    One statement for the whole batch, in plain SQL like ``_room_last_seqs_set``:
    an ORM update per (room, author) cost more Python than the batch's insert.
    """
    own: dict[tuple[int, int], int] = {}
    for message in messages:
        key = (message.room_id, message.author_id)
        own[key] = own.get(key, 0) + 1
    if not own:
        return
    quote = connection.ops.quote_name
    column = quote("uncounted_after_read")
    room, user = (
        quote(model_column(Membership, "room")),
        quote(model_column(Membership, "user")),
    )
    pair = f"({room} = %s AND {user} = %s)"
    cases = " ".join(f"WHEN {pair} THEN %s" for _ in own)
    sql = (
        f"UPDATE {quote(Membership._meta.db_table)} SET {column} = {column} + "
        f"CASE {cases} ELSE 0 END WHERE {' OR '.join(pair for _ in own)}"
    )
    params: list[int] = []
    for (room_id, user_id), count in own.items():
        params += [room_id, user_id, count]
    for room_id, user_id in own:
        params += [room_id, user_id]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def _replies_count(messages: list[Message]) -> None:
    counts: dict[int, int] = {}
    for message in messages:
        if message.reply_to_id is not None:
            counts[message.reply_to_id] = counts.get(message.reply_to_id, 0) + 1
    for root, count in counts.items():
        Message.objects.filter(pk=root).update(reply_count=F("reply_count") + count)


def _store_mentions(messages: list[Message]) -> dict[int, list[int]]:
    """Parse, store and count the mentions of new messages.

    Sets each message's ``mention_names``; answers, per message id, the ids of
    the users mentioned other than its author (to notify after commit).
    """
    by_message = _mentioned_users(messages)
    rows: list[Mention] = []
    notify: dict[int, list[int]] = {}
    for message in messages:
        allowed = by_message.get(message.pk)
        if not allowed:
            continue
        message.mention_names = list(allowed)
        Message.objects.filter(pk=message.pk).update(mention_names=list(allowed))
        rows.extend(_mention_rows(message, allowed.values()))
        others = [pk for pk in allowed.values() if pk != message.author_id]
        if others:
            notify[message.pk] = others
            Membership.objects.filter(
                room_id=message.room_id, user_id__in=others
            ).update(unread_mentions=F("unread_mentions") + 1)
    Mention.objects.bulk_create(rows)
    return notify


def _mentioned_users(messages: list[Message]) -> dict[int, dict[str, int]]:
    """Per message id, the users its body mentions who may read its room:
    username to user id, in the order of first mention (none: left out)."""
    candidates = {m.pk: mentions.mention_candidates(m.body) for m in messages}
    names = {name for found in candidates.values() for c in found for name in c}
    if not names:
        return {}
    User = get_user_model()
    users = {
        username: pk
        for pk, username in User.objects.filter(
            **{f"{User.USERNAME_FIELD}__in": names, "is_active": True}
        ).values_list("pk", User.USERNAME_FIELD)
    }
    by_message = {
        m.pk: mentions.resolve_mentions(candidates[m.pk], set(users)) for m in messages
    }
    readers = _readers_among(
        messages, {users[n] for found in by_message.values() for n in found}
    )
    mentioned: dict[int, dict[str, int]] = {}
    for message in messages:
        allowed = {
            name: users[name]
            for name in by_message[message.pk]
            if (message.room_id, users[name]) in readers
        }
        if allowed:
            mentioned[message.pk] = allowed
    return mentioned


def _mention_rows(message: Message, user_ids: Iterable[int]) -> list[Mention]:
    return [
        Mention(message=message, user_id=pk, room_id=message.room_id, seq=message.seq)
        for pk in user_ids
    ]


def _mentions_reparse(message: Message) -> list[int]:
    """After an edit: the message's mentions as its new body has them.

    Rows and ``mention_names`` follow the body; the unread-mention counters of
    the members whose read marker is before the message gain the mentions
    added and lose those dropped (the author's own never count). Answers the
    ids of the users newly mentioned other than the author, to notify.
    """
    now = _mentioned_users([message]).get(message.pk, {})
    before = set(
        Mention.objects.filter(message=message).values_list("user_id", flat=True)
    )
    added = [pk for pk in now.values() if pk not in before]
    dropped = before - set(now.values())
    message.mention_names = list(now)
    Message.objects.filter(pk=message.pk).update(mention_names=list(now))
    if dropped:
        Mention.objects.filter(message=message, user_id__in=dropped).delete()
    Mention.objects.bulk_create(_mention_rows(message, added))
    unread_to = Membership.objects.filter(
        room_id=message.room_id, read_seq__lt=message.seq
    ).exclude(user_id=message.author_id)
    if added:
        unread_to.filter(user_id__in=added).update(
            unread_mentions=F("unread_mentions") + 1
        )
    if dropped:
        unread_to.filter(user_id__in=dropped, unread_mentions__gt=0).update(
            unread_mentions=F("unread_mentions") - 1
        )
    return [pk for pk in added if pk != message.author_id]


def _readers_among(messages: list[Message], user_ids: set[int]) -> set[tuple[int, int]]:
    """The (room id, user id) pairs where the user may read the room: members,
    or anyone in a public room, unless banned from it."""
    if not user_ids:
        return set()
    room_ids = {m.room_id for m in messages}
    members = set(
        Membership.objects.filter(
            room_id__in=room_ids, user_id__in=user_ids
        ).values_list("room_id", "user_id")
    )
    banned = set(
        Ban.objects.active()
        .filter(room_id__in=room_ids, user_id__in=user_ids)
        .values_list("room_id", "user_id")
    )
    readers = set()
    for message in messages:
        for user_id in user_ids:
            pair = (message.room_id, user_id)
            if pair in banned:
                continue
            if pair in members or not message.room.is_private:
                readers.add(pair)
    return readers


def _mention_notifications(
    messages: list[Message], mentioned: dict[int, list[int]]
) -> list[fanout.Delivery]:
    deliveries: list[fanout.Delivery] = []
    for message in messages:
        user_ids = mentioned.get(message.pk)
        if not user_ids:
            continue
        payload = protocol.message_payload(message, message.room.slug, message.author)
        frame = protocol.mention_notification(payload=payload)
        deliveries.extend(
            fanout.Delivery((fanout.user_group(user_id),), frame=frame)
            for user_id in user_ids
        )
    return deliveries


def _room_last_seqs_set(last_seqs: dict[int, int]) -> None:
    """Set many rooms' ``last_seq`` in one statement.

    Plain SQL: the ORM's ``Case(When(…))`` for a batch touching many rooms cost
    more to build than the database took to run it.
    """
    quote = connection.ops.quote_name
    cases = " ".join("WHEN %s THEN %s" for _ in last_seqs)
    ids = ", ".join("%s" for _ in last_seqs)
    sql = (
        f"UPDATE {quote(Room._meta.db_table)} SET {quote('last_seq')} = "
        f"CASE {quote('id')} {cases} END WHERE {quote('id')} IN ({ids})"
    )
    params = [value for pair in last_seqs.items() for value in pair]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *last_seqs])


def _frames_by_room(
    messages: list[Message],
) -> Iterable[tuple[Room, list[protocol.MessageFrame]]]:
    by_room: dict[int, tuple[Room, list[protocol.MessageFrame]]] = {}
    for message in messages:
        payload = protocol.message_payload(message, message.room.slug, message.author)
        by_room.setdefault(message.room.pk, (message.room, []))[1].append(
            protocol.message(payload)
        )
    return by_room.values()


def _muted_error(room: Room, mute: Mute) -> ChatError:
    until = f" until {protocol.timestamp(mute.expires_at)}" if mute.expires_at else ""
    return ChatError(MUTED, f"you are muted in {room.slug!r}{until}: {mute.reason}")


def _check_not_muted(*, room: Room, user: User) -> None:
    mute = selectors.mute_get_active(room=room, user=user)
    if mute is not None:
        raise _muted_error(room, mute)


def _message_by_client_id(*, author: User, client_msg_id: str) -> Message | None:
    return (
        Message.objects.select_related("room")
        .filter(author=author, client_msg_id=client_msg_id)
        .first()
    )


def direct_message_create(
    *, author: User, to_username: str, body: str, client_msg_id: str
) -> tuple[Message, bool]:
    """Send ``body`` to the direct conversation of ``author`` and ``to_username``."""
    existing = _message_by_client_id(author=author, client_msg_id=client_msg_id)
    if existing is not None:
        return existing, False
    other = selectors.user_get_active(username=to_username)
    room = direct_room_get_or_create(user=author, other=other)
    return message_create(
        room=room, author=author, body=body, client_msg_id=client_msg_id
    )


def _message_for_change(*, room: Room, message_id: int, user: User) -> Message:
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


def message_edit(*, room: Room, message_id: int, user: User, body: str) -> Message:
    """Replace a message's body (the author's own, or any as moderator)."""
    _check_not_muted(room=room, user=user)
    with transaction.atomic():
        message = _message_for_change(room=room, message_id=message_id, user=user)
        message.body = body
        message.edited_at = timezone.now()
        message.save(update_fields=["body", "edited_at"])
        message.room = room
        newly_mentioned = _mentions_reparse(message)
        frame = protocol.message_edited(room_slug=room.slug, message=message)
        _emit(_to_room(room, frame))
        if newly_mentioned:
            notify = {message.pk: newly_mentioned}
            _emit(*_mention_notifications([message], notify))
    return message


def message_delete(*, room: Room, message_id: int, user: User) -> Message:
    """Delete a message for everyone; it stays in history without its body."""
    with transaction.atomic():
        message = _message_for_change(room=room, message_id=message_id, user=user)
        _message_soft_delete(message, room)
        if message.author_id != user.pk:
            _record(
                Kind.MESSAGE_DELETE,
                actor=user,
                target_user=message.author,
                room=room,
                message=message,
            )
    return message


def _message_soft_delete(message: Message, room: Room) -> None:
    message.deleted_at = timezone.now()
    message.save(update_fields=["deleted_at"])
    # Unread to those whose marker is before it: no longer.
    before_it = Membership.objects.filter(room=room, read_seq__lt=message.seq)
    before_it.exclude(user_id=message.author_id).update(
        uncounted_after_read=F("uncounted_after_read") + 1
    )
    mentioned = Mention.objects.filter(message=message).values("user_id")
    before_it.filter(user_id__in=mentioned, unread_mentions__gt=0).exclude(
        user_id=message.author_id
    ).update(unread_mentions=F("unread_mentions") - 1)
    frame = protocol.message_deleted(room_slug=room.slug, message=message)
    _emit(_to_room(room, frame))


def message_hide(
    *, message: Message, actor: User | None = None, reason: str = ""
) -> Message:
    """Delete a message as a moderator (admin): the room sees it go."""
    with transaction.atomic():
        message = (
            Message.objects.select_for_update()
            .select_related("room")
            .get(pk=message.pk)
        )
        if message.deleted_at is not None:
            return message
        _message_soft_delete(message, message.room)
        _record(
            Kind.MESSAGE_DELETE,
            actor=actor,
            reason=reason,
            target_user_id=message.author_id,
            room=message.room,
            message=message,
        )
    return message


def read_marker_set(
    *, room: Room, user: User, seq: int
) -> tuple[selectors.ReadState, int]:
    """Move the read marker forward to ``seq``: never back, never past the end.

    The counters lose what the marker passed over (own or deleted messages,
    mentions), counted over that range only. Every socket of the user, on every
    process, gets ``read_marker`` after commit, so other tabs clear their
    badges. Answers the read state after the move and the room's last seq.
    """
    with transaction.atomic():
        # The membership row's lock orders this with a concurrent delete, which
        # moves the counters of markers before the deleted message.
        membership = (
            Membership.objects.select_for_update().filter(room=room, user=user).first()
        )
        if membership is None:
            raise ChatError(NOT_FOUND, f"you are not a member of {room.slug!r}")
        last_seq = Room.objects.values_list("last_seq", flat=True).get(pk=room.pk)
        seq = min(seq, last_seq)
        if seq > membership.read_seq:
            passed = Message.objects.filter(
                room=room, seq__gt=membership.read_seq, seq__lte=seq
            )
            uncounted = passed.filter(
                Q(author=user) | Q(deleted_at__isnull=False)
            ).count()
            mentioned = (
                Mention.objects.filter(
                    user=user, room=room, seq__gt=membership.read_seq, seq__lte=seq
                )
                .filter(message__deleted_at__isnull=True)
                .exclude(message__author=user)
                .count()
            )
            membership.read_seq = seq
            membership.uncounted_after_read = max(
                membership.uncounted_after_read - uncounted, 0
            )
            membership.unread_mentions = max(membership.unread_mentions - mentioned, 0)
            membership.save(
                update_fields=["read_seq", "uncounted_after_read", "unread_mentions"]
            )
        state = selectors.read_state(membership)
        frame = protocol.read_marker(
            room_slug=room.slug,
            seq=state.read_seq,
            unread=state.unread(last_seq),
            mentions=state.mentions,
        )
        _emit(fanout.Delivery((fanout.user_group(user.pk),), frame=frame))
    return state, last_seq


# --- uploads --------------------------------------------------------------------


def upload_create(*, owner: User, file: UploadedFile) -> Upload:
    """Store an uploaded file through the default storage, typed by its bytes."""
    from django.conf import settings

    if file.size is not None and file.size > settings.CHAT_MAX_UPLOAD_BYTES:
        raise ChatError(
            TOO_LARGE,
            f"the file is over {settings.CHAT_MAX_UPLOAD_BYTES} bytes",
        )
    head = file.read(uploads.SNIFF_BYTES)
    file.seek(0)
    upload = Upload(
        owner=owner,
        name=uploads.clean_name(file.name or ""),
        size=file.size or 0,
        content_type=uploads.sniff_content_type(head),
    )
    upload.file.save(upload.name, file, save=False)
    upload.save()
    return upload


def uploads_unattached_delete(*, older_than: timedelta) -> int:
    """Remove the uploads never attached to a message, files too; how many."""
    stale = Upload.objects.filter(
        message__isnull=True, created_at__lt=timezone.now() - older_than
    )
    count = 0
    for upload in stale.iterator():
        upload.file.delete(save=False)
        upload.delete()
        count += 1
    return count


# --- reactions ------------------------------------------------------------------


def _reaction_summary(message: Message) -> list[dict[str, Any]]:
    """A message's reactions as message objects carry them, from its rows."""
    summary: dict[str, dict[str, Any]] = {}
    rows = (
        Reaction.objects.filter(message=message)
        .order_by("id")
        .values_list("emoji", "user__username")
    )
    for emoji, username in rows:
        entry = summary.setdefault(emoji, {"emoji": emoji, "count": 0, "users": []})
        entry["count"] += 1
        if len(entry["users"]) < protocol.REACTION_USERS_LISTED:
            entry["users"].append(username)
    return list(summary.values())


def reaction_set(
    *, room: Room, message_id: int, user: User, emoji: str, on: bool = True
) -> Message:
    """Add (``on``) or take back ``user``'s ``emoji`` on a message of ``room``.

    Reacting twice is one reaction, taking back one never given changes
    nothing; a change goes to the room as ``reaction`` after commit.
    """
    _check_not_muted(room=room, user=user)
    with transaction.atomic():
        # Locked: concurrent reactions to one message rebuild its summary in turn.
        message = (
            Message.objects.select_for_update()
            .filter(room=room, pk=message_id, deleted_at__isnull=True)
            .first()
        )
        if message is None:
            raise ChatError(NOT_FOUND, f"no message {message_id} in room {room.slug!r}")
        if Room.objects.filter(pk=room.pk, is_closed=True).exists():
            raise ChatError(ROOM_CLOSED, f"room {room.slug!r} is closed")
        if on:
            _, changed = Reaction.objects.get_or_create(
                message=message, user=user, emoji=emoji
            )
        else:
            deleted, _ = Reaction.objects.filter(
                message=message, user=user, emoji=emoji
            ).delete()
            changed = deleted > 0
        if changed:
            message.reaction_summary = _reaction_summary(message)
            message.save(update_fields=["reaction_summary"])
            count = next(
                (r["count"] for r in message.reaction_summary if r["emoji"] == emoji),
                0,
            )
            frame = protocol.reaction(
                room_slug=room.slug,
                message=message,
                emoji=emoji,
                username=user.get_username(),
                on=on,
                count=count,
            )
            _emit(_to_room(room, frame))
    return message


def api_token_create(*, user: User, name: str = "") -> tuple[ApiToken, str]:
    """Create an API token for ``user``; return it and the key, shown only once."""
    key = ApiToken.new_key()
    token = ApiToken.objects.create(
        user=user, name=name, key_hash=ApiToken.hash_key(key), hint=key[:10]
    )
    return token, key


def api_token_use_note(*, token_id: int) -> None:
    """Record that a token was used now (callers do so once a resolution)."""
    api_token_uses_note(token_ids=[token_id])


def api_token_uses_note(*, token_ids: Sequence[int]) -> None:
    """Record that these tokens were used now, in one UPDATE."""
    ApiToken.objects.filter(pk__in=token_ids).update(last_used_at=timezone.now())


# Handshakes note their token's use without waiting for the write: the uses of
# one second go out in one UPDATE, so a handshake reads the database once and a
# reconnect storm's thousand stale tokens cost one write, not a thousand.
TOKEN_USES_WRITTEN_AFTER_SECONDS = 1.0
_token_uses: PerLoop[set[int]] = PerLoop(set)


def api_token_use_soon(*, token_id: int) -> None:
    """Note a token's use; it is written within a second (in the running loop)."""
    _token_uses.get().add(token_id)
    token_uses_writer.start()


async def _token_uses_write_later() -> None:
    pending = _token_uses.get()
    # Uses noted while a write is under way are taken by the next turn.
    while pending:
        await asyncio.sleep(TOKEN_USES_WRITTEN_AFTER_SECONDS)
        await api_token_uses_write()


async def api_token_uses_write() -> None:
    """Write the token uses noted so far, now."""
    pending = _token_uses.get()
    token_ids = sorted(pending)
    pending.clear()
    if not token_ids:
        return
    try:
        await database_sync_to_async(api_token_uses_note)(token_ids=token_ids)
    except DATABASE_OUTAGE_ERRORS as exc:
        # Only a last-used time: not worth keeping for a retry.
        logger.warning(
            "noting %d token uses: database unavailable: %s", len(token_ids), exc
        )


token_uses_writer = BackgroundTask(_token_uses_write_later)


async def token_uses_reset() -> None:
    """Stop the writer and forget what waits (tests start each loop afresh)."""
    await token_uses_writer.stop()
    _token_uses.pop()


def api_token_revoke(*, token: ApiToken, actor: User | None = None) -> ApiToken:
    """Revoke a token and close the sockets opened with it."""
    if token.revoked_at is not None:
        return token
    with transaction.atomic():
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        _record(
            Kind.TOKEN_REVOKE,
            actor=actor,
            target_user=token.user,
            detail=f"token {token.hint}",
        )
        _emit(
            _close_sockets(token.user_id, "token revoked", match={"token_id": token.pk})
        )
    return token


# --- moderation ---------------------------------------------------------------


def user_ban(
    *,
    user: User,
    reason: str,
    expires_at: datetime | None = None,
    actor: User | None = None,
) -> Ban:
    """Ban ``user`` from the site: their sockets close with 4403 and the reason."""
    with transaction.atomic():
        ban = Ban.objects.create(
            user=user, reason=reason, expires_at=expires_at, created_by=actor
        )
        _record(
            Kind.BAN,
            actor=actor,
            target_user=user,
            reason=reason,
            detail=_until(expires_at),
        )
        _emit(*_enforcement(ban))
    return ban


def room_ban(
    *,
    user: User,
    room: Room,
    reason: str,
    expires_at: datetime | None = None,
    actor: User | None = None,
) -> Ban:
    """Ban ``user`` from ``room``: their sockets there get ``removed``."""
    with transaction.atomic():
        ban = Ban.objects.create(
            user=user, room=room, reason=reason, expires_at=expires_at, created_by=actor
        )
        _record(
            Kind.ROOM_BAN,
            actor=actor,
            target_user=user,
            room=room,
            reason=reason,
            detail=_until(expires_at),
        )
        _emit(*_enforcement(ban))
    return ban


def ban_update(*, ban: Ban, actor: User | None = None) -> Ban:
    """Record a changed ban (reason, expiry) and enforce it if it is in force."""
    with transaction.atomic():
        ban.save()
        kind = Kind.ROOM_BAN if ban.room_id else Kind.BAN
        _record(
            kind,
            actor=actor,
            target_user=ban.user,
            room=ban.room,
            reason=ban.reason,
            detail=f"changed: {_until(ban.expires_at)}",
        )
        _emit(*_enforcement(ban))
    return ban


def _enforcement(ban: Ban) -> tuple[fanout.Delivery, ...]:
    """Close the banned user's sockets (site ban) or take them out of the room."""
    if not ban.is_active:
        return ()
    room = ban.room  # no query for a site ban: its room_id is None
    if room is None:
        return (_close_sockets(ban.user_id, f"banned: {ban.reason}"),)
    order: fanout.RemoveOrder = {
        "action": "remove",
        "room": room.slug,
        "reason": f"banned from the room: {ban.reason}",
    }
    return (_order([fanout.user_group(ban.user_id)], order),)


def ban_lift(*, ban: Ban, actor: User | None = None) -> None:
    """End a ban now."""
    with transaction.atomic():
        kind = Kind.ROOM_UNBAN if ban.room_id else Kind.UNBAN
        _record(kind, actor=actor, target_user=ban.user, room=ban.room)
        ban.delete()


def user_mute(
    *,
    user: User,
    room: Room,
    reason: str,
    expires_at: datetime | None = None,
    actor: User | None = None,
) -> Mute:
    """Mute ``user`` in ``room``: ``send`` answers ``muted`` until it ends."""
    with transaction.atomic():
        mute = Mute.objects.create(
            user=user, room=room, reason=reason, expires_at=expires_at, created_by=actor
        )
        _record(
            Kind.MUTE,
            actor=actor,
            target_user=user,
            room=room,
            reason=reason,
            detail=_until(expires_at),
        )
    return mute


def mute_lift(*, mute: Mute, actor: User | None = None) -> None:
    with transaction.atomic():
        _record(Kind.UNMUTE, actor=actor, target_user=mute.user, room=mute.room)
        mute.delete()


def room_close(*, room: Room, actor: User | None = None, reason: str = "") -> Room:
    """Close a room for writing: its sockets get ``removed``; history stays."""
    with transaction.atomic():
        Room.objects.filter(pk=room.pk).update(is_closed=True)
        room.is_closed = True
        _record(Kind.ROOM_CLOSE, actor=actor, room=room, reason=reason)
        text = f"room closed: {reason}" if reason else "room closed"
        order: fanout.RemoveOrder = {
            "action": "remove",
            "room": room.slug,
            "reason": text,
        }
        _emit(_order(fanout.room_groups(room), order, match={"room": room.slug}))
    return room


ROOM_REOPENED_EVENT = "room.reopened"


def room_reopen(*, room: Room, actor: User | None = None) -> Room:
    """Open a closed room for writing again; the sockets in it hear of it.

    A page still on the room when it closed stays joined to it, read-only: a
    ``push`` of ``room.reopened`` makes it writable again without a reload.
    """
    with transaction.atomic():
        Room.objects.filter(pk=room.pk).update(is_closed=False)
        room.is_closed = False
        _record(Kind.ROOM_REOPEN, actor=actor, room=room)
        _emit(
            _push_delivery(
                fanout.room_groups(room),
                ROOM_REOPENED_EVENT,
                {"room": room.slug},
                match={"room": room.slug},
            )
        )
    return room


def session_fingerprint(session_key: str) -> str:
    """A short stand-in for a session key that sockets can be matched by."""
    return hashlib.sha256(session_key.encode()).hexdigest()[:16]


def session_sign_out(*, user_id: int, session_key: str) -> None:
    """Close the sockets opened with one session, now ended (4403)."""
    match: fanout.Match = {"session": session_fingerprint(session_key)}
    _emit(_close_sockets(user_id, "signed out", match=match))


def user_sign_out_everywhere(*, user: User, actor: User | None = None) -> int:
    """End all of ``user``'s sessions; sockets opened with them close (4403)."""
    from django.contrib.sessions.models import Session

    with transaction.atomic():
        doomed = [
            session.pk
            for session in Session.objects.filter(expire_date__gt=timezone.now())
            if str(session.get_decoded().get("_auth_user_id")) == str(user.pk)
        ]
        Session.objects.filter(pk__in=doomed).delete()
        _record(
            Kind.SIGN_OUT,
            actor=actor,
            target_user=user,
            detail=f"{len(doomed)} session(s)",
        )
        _emit(_close_sockets(user.pk, "signed out", match={"auth": "session"}))
    return len(doomed)


def membership_remove(*, membership: Membership, actor: User | None = None) -> None:
    """End a membership; in a private room the user's sockets there get ``removed``.

    A public room stays open to them (they may join again); a private one is
    closed to them at once, on every process.
    """
    room = membership.room
    with transaction.atomic():
        membership.delete()
        _record(
            Kind.MEMBERSHIP_REMOVE, actor=actor, target_user=membership.user, room=room
        )
        if room.is_private:
            order: fanout.RemoveOrder = {
                "action": "remove",
                "room": room.slug,
                "reason": "you are no longer a member of the room",
            }
            _emit(_order([fanout.user_group(membership.user_id)], order))


def room_leave(*, room: Room, user: User) -> None:
    """``user`` leaves ``room`` (recorded as a removal by themselves).

    ``ChatError`` (``bad_request``) for a direct conversation or a non-member.
    """
    if room.is_direct:
        raise ChatError(BAD_REQUEST, "you cannot leave a direct conversation")
    membership = selectors.membership_get(room=room, user=user)
    if membership is None:
        raise ChatError(BAD_REQUEST, "you are not a member of this room")
    membership_remove(membership=membership, actor=user)


def user_deactivate(*, user: User, actor: User | None = None) -> User:
    """Deactivate an account: its sockets close with 4403, and it cannot sign in."""
    with transaction.atomic():
        type(user).objects.filter(pk=user.pk).update(is_active=False)
        user.is_active = False
        _record(Kind.DEACTIVATE, actor=actor, target_user=user)
        _emit(_close_sockets(user.pk, "account deactivated"))
    return user


def connection_disconnect(
    *, connection_id: str, actor: User | None = None, reason: str = ""
) -> None:
    """Close one live socket, wherever it is, with 4403."""
    with transaction.atomic():
        _record(
            Kind.DISCONNECT,
            actor=actor,
            reason=reason,
            detail=f"connection {connection_id}",
        )
        text = f"kicked by a moderator: {reason}" if reason else "kicked by a moderator"
        group = fanout.connection_group(connection_id)
        match: fanout.Match = {"connection_id": connection_id}
        _emit(_order([group], _close_order(text), match=match))


def _until(expires_at: datetime | None) -> str:
    return f"until {protocol.timestamp(expires_at)}" if expires_at else "no end"


# --- live only: nothing stored, so nothing to wait for --------------------------


async def typing_send(*, room: Room, user: User) -> None:
    """Tell the room's other sockets that ``user`` is typing."""
    frame = protocol.typing(room_slug=room.slug, username=user.get_username())
    await _emit_now(_to_room(room, frame, exclude_user=user.pk))


async def device_connections_replace(
    *, user_id: int, device: str, connection_id: str
) -> None:
    """Close the user's older sockets with the same device key (4409)."""
    order = _close_order(
        "replaced by a newer connection with the same device key",
        code=CLOSE_REPLACED,
    )
    match: fanout.Match = {"device": device, "not_connection_id": connection_id}
    await _emit_now(_order([fanout.user_group(user_id)], order, match=match))


def _presence_frame(room: Room, username: str, status: str) -> protocol.Presence:
    return protocol.presence(room_slug=room.slug, username=username, status=status)


# Up to this many users online, each change is a presence frame; above, the
# room's changes go out together, one presence_batch a second at most.
PRESENCE_BATCH_ABOVE = 50
PRESENCE_BATCH_SECONDS = 1.0


async def room_presence_enter(
    *,
    room: Room,
    connection_id: str,
    user: User,
    rooms: Iterable[str] | None = None,
) -> tuple[list[str], int, int]:
    """Record a socket in ``room``; tell the others if the user just came online.

    ``rooms``: every room the socket has joined now (see ``presence.room_enter``).
    Answer the room's online names (up to ``presence.ONLINE_LISTED``), their
    count and the presence version they are at: the socket skips the presence
    frames of changes up to it (``ChatConsumer.presence_floors``).
    """
    first, online, online_count, version = await presence.room_enter(
        room=room, connection_id=connection_id, user=user, rooms=rooms
    )
    if first:
        await _presence_change(
            room,
            user.get_username(),
            "online",
            online_count,
            exclude_user=user.pk,
            version=version,
        )
    return online, online_count, version


async def room_presence_exit(*, room: Room, connection_id: str, user: User) -> None:
    """Forget a socket in ``room``; tell the others if it was the user's last."""
    last, online_count, version = await presence.room_exit_begin(
        room=room, connection_id=connection_id, user=user
    )
    if last:
        # Counted as it was, the user still in: a room at the threshold
        # batches both ways.
        await _presence_change(
            room,
            user.get_username(),
            "offline",
            online_count + 1,
            exclude_user=user.pk,
            version=version,
        )
    # Not reached when emitting fails or the process dies first: the entry
    # stays leaving, and a sweep reports the user gone a heartbeat later.
    await presence.room_exit_end(room=room, connection_id=connection_id, user=user)


async def room_presence_sweep_report(*, gone: Iterable[tuple[int, str]]) -> None:
    """Report offline the users a presence sweep found gone: (room_id, username)."""
    by_room: dict[int, list[str]] = {}
    for room_id, username in gone:
        by_room.setdefault(room_id, []).append(username)
    # One read of the room and of its count per room, however many went: a
    # dead process may leave a thousand users of one room behind.
    for room_id, usernames in by_room.items():
        room = await selectors.room_get_by_id_async(room_id)
        if room is None:
            continue
        # Counted as it was, all of them still in.
        online_count = await presence.room_online_count(room) + len(usernames)
        for username in usernames:
            await _presence_change(room, username, "offline", online_count)


async def _presence_change(
    room: Room,
    username: str,
    status: str,
    online_count: int,
    *,
    exclude_user: int | None = None,
    version: int | None = None,
) -> None:
    """One user's change of presence, told to the room.

    ``online_count`` is the room's, the user counted. Up to the threshold it
    is a presence frame now; above, it waits for the room's next
    presence_batch, which the process that found none due sends a second
    later, built once for every member on every process. ``version``: the
    room's presence version the change made (sockets that joined at it or
    later skip the frame); None for one found by a sweep.
    """
    if online_count <= PRESENCE_BATCH_ABOVE:
        frame = _presence_frame(room, username, status)
        groups = tuple(fanout.room_groups(room))
        await _emit_now(
            fanout.Delivery(
                groups,
                frame=frame,
                exclude_user=exclude_user,
                presence_version=None if room.is_direct else version,
            )
        )
        return
    if await presence.room_batch_add(room=room, username=username, status=status):
        presence_batches.start(room)


async def _presence_batch_send(room: Room) -> None:
    await asyncio.sleep(PRESENCE_BATCH_SECONDS)
    changes, online_count = await presence.room_batch_take(room=room)
    if changes:
        frame = protocol.presence_batch(
            room_slug=room.slug, changes=changes, online_count=online_count
        )
        await _emit_now(_to_room(room, frame))


presence_batches = RoomTasks(_presence_batch_send, "presence batch")


async def _push(delivery: fanout.Delivery, event: str, count: int) -> int:
    await _emit_now(delivery)
    logger.info("push %r reached %d connection(s)", event, count)
    return count


def _push_delivery(
    groups: Iterable[str],
    event: str,
    data: object,
    *,
    match: fanout.Match | None = None,
) -> fanout.Delivery:
    frame = protocol.push(event=event, data=data)
    return fanout.Delivery(tuple(groups), frame=frame, match=match)


async def push_to_user(*, user_id: int, event: str, data: object) -> int:
    """A ``push`` frame to every live socket of ``user_id``; return how many."""
    count = await registry.live_count(user_id=user_id)
    delivery = _push_delivery([fanout.user_group(user_id)], event, data)
    return await _push(delivery, event, count)


async def push_to_room(*, slug: str, event: str, data: object) -> int:
    """A ``push`` frame to every live socket that joined the room ``slug``."""
    room = await selectors.room_get_async(slug=slug)
    count = await presence.room_socket_count(room)
    groups = fanout.room_groups(room)
    delivery = _push_delivery(groups, event, data, match={"room": room.slug})
    return await _push(delivery, event, count)


async def push_to_connection(*, connection_id: str, event: str, data: object) -> int:
    """A ``push`` frame to the one live socket ``connection_id``."""
    count = await registry.live_count(connection_id=connection_id)
    group = fanout.connection_group(connection_id)
    match: fanout.Match = {"connection_id": connection_id}
    delivery = _push_delivery([group], event, data, match=match)
    return await _push(delivery, event, count)


async def push_to_everyone(*, event: str, data: object) -> int:
    """A ``push`` frame to every live socket."""
    count = await registry.live_count()
    delivery = _push_delivery([fanout.EVERYONE_GROUP], event, data)
    return await _push(delivery, event, count)
