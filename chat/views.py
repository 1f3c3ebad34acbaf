"""Web pages: sign up, the room list, a room."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from django.conf import settings
from django.contrib.auth import login, logout
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError
from django.db.models import prefetch_related_objects
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from chat import protocol, push, selectors, services
from chat.forms import DirectStartForm, RoomCreateForm
from chat.models import ApiToken, Room
from chat.protocol import FORBIDDEN, NOT_FOUND, ChatError

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    class AuthenticatedRequest(HttpRequest):
        """The request of a view behind ``login_required``."""

        user: User


def signup(request: HttpRequest) -> HttpResponse:
    """Create an account, sign it in and go to the room list."""
    form: UserCreationForm = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect("chat:room_list")
    return render(request, "registration/signup.html", {"form": form})


@require_POST
def sign_out(request: HttpRequest) -> HttpResponse:
    """Sign out of this session; the sockets it opened close at once (4403)."""
    user_id, session_key = request.user.pk, request.session.session_key
    logout(request)
    if user_id is not None and session_key:
        services.session_sign_out(user_id=user_id, session_key=session_key)
    return redirect(settings.LOGOUT_REDIRECT_URL)


def _direct_partner_name(room: Room, user: User) -> str:
    """The other user's name in a direct conversation (one's own, to oneself)."""
    names = [m.user.get_username() for m in room.memberships.all() if m.user != user]
    return names[0] if names else user.get_username()


def _room_list_page(
    request: AuthenticatedRequest,
    *,
    create_form: RoomCreateForm | None = None,
    direct_form: DirectStartForm | None = None,
) -> HttpResponse:
    rooms = selectors.room_list_for_user(user=request.user).prefetch_related(
        "memberships__user"
    )
    public: list[Room] = []
    private: list[Room] = []
    direct: list[tuple[Room, str]] = []
    for room in rooms:
        if room.is_direct:
            direct.append((room, _direct_partner_name(room, request.user)))
        elif room.is_private:
            private.append(room)
        else:
            public.append(room)
    context = {
        "public_rooms": public,
        "private_rooms": private,
        "direct_rooms": direct,
        "create_form": create_form or RoomCreateForm(),
        "direct_form": direct_form or DirectStartForm(),
    }
    return render(request, "chat/room_list.html", context)


@login_required
def room_list(request: AuthenticatedRequest) -> HttpResponse:
    return _room_list_page(request)


@login_required
@require_POST
def room_create(request: AuthenticatedRequest) -> HttpResponse:
    form = RoomCreateForm(request.POST)
    if not form.is_valid():
        return _room_list_page(request, create_form=form)
    try:
        room = services.room_create(
            slug=form.cleaned_data["slug"],
            title=form.cleaned_data["title"],
            is_private=form.cleaned_data["is_private"],
            creator=request.user,
        )
    except IntegrityError:
        # Someone took the slug between the form's check and the insert.
        form.add_error("slug", RoomCreateForm.SLUG_TAKEN)
        return _room_list_page(request, create_form=form)
    return redirect("chat:room", slug=room.slug)


@login_required
@require_POST
def direct_start(request: AuthenticatedRequest) -> HttpResponse:
    form = DirectStartForm(request.POST)
    if not form.is_valid():
        return _room_list_page(request, direct_form=form)
    room = services.direct_room_get_or_create(
        user=request.user, other=form.cleaned_data["other"]
    )
    return redirect("chat:room", slug=room.slug)


@login_required
def room_detail(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    try:
        room = selectors.room_get_readable(slug=slug, user=request.user)
    except ChatError as exc:
        if exc.code == NOT_FOUND:
            raise Http404(exc.message) from None
        if exc.code == FORBIDDEN:
            raise PermissionDenied(exc.message) from None
        raise
    name = room.title
    if room.is_direct:
        prefetch_related_objects([room], "memberships__user")
        name = _direct_partner_name(room, request.user)
    config = {"room": room.slug, "username": request.user.get_username()}
    context = {"room": room, "name": name, "chat_config": config}
    return render(request, "chat/room.html", context)


# --- HTTP API -------------------------------------------------------------------


def _api_error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


@csrf_exempt
@require_POST
def api_push(request: HttpRequest) -> JsonResponse:
    """POST /api/push: a ``push`` frame to a user, a room, a connection or all."""
    key = ApiToken.key_from_authorization(request.headers.get("Authorization", ""))
    found = selectors.token_user_get(key=key) if key else None
    if found is None:
        return _api_error(401, "send Authorization: Bearer <API token>")
    if found.use_stale:
        services.api_token_use_note(token_id=found.token_id)
    if not found.user.has_perm("chat.push_message"):
        return _api_error(
            403, "this token's user lacks the chat.push_message permission"
        )
    try:
        body = protocol.parse_push_request(request.body)
        target, value = body.target()
        count = _push_to(target, value, body.event, body.data)
    except ChatError as exc:
        return _api_error(400, exc.message)
    return JsonResponse({"connections": count}, status=202)


def _push_to(target: str, value: str, event: str, data: object) -> int | Awaitable[int]:
    # A sync view: push.* run to completion and return the count itself.
    if target == "all":
        return push.to_everyone(event, data)
    if target == "user":
        return push.to_user(selectors.user_get_active(username=value), event, data)
    if target == "room":
        return push.to_room(value, event, data)
    return push.to_connection(value, event, data)
