"""Web pages, the HTTP API; site-wide: error pages, NUL check, CSP, site bans,
sign-in lockout."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

from csp.middleware import CSPMiddleware, PolicyParts
from django.conf import settings
from django.contrib.auth import login, logout
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.core.exceptions import DisallowedHost
from django.db import IntegrityError
from django.db.models import prefetch_related_objects
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseServerError,
    JsonResponse,
)
from django.http.response import HttpResponseBase
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import redirect, render
from django.template import loader
from django.templatetags.static import static
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import (
    require_http_methods,
    require_POST,
    require_safe,
)

from chat import protocol, push, selectors, services, throttle, uploads
from chat.forms import DirectStartForm, RoomCreateForm
from chat.models import ApiToken, Ban, Room, Upload
from chat.protocol import FORBIDDEN, NOT_FOUND, ChatError
from chat.selectors import RoomBanned, RoomHidden

GetResponse = Callable[[HttpRequest], HttpResponseBase]

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    class AuthenticatedRequest(HttpRequest):
        """The request of a view behind ``login_required``."""

        user: User


@require_http_methods(["GET", "HEAD", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    """Create an account, sign it in and go to the room list."""
    form: UserCreationForm = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        wait = throttle.signup_refusal(address=client_ip_address(request))
        if wait is not None:
            minutes = max(wait // 60, 1)
            page = render(
                request,
                "registration/signup_paused.html",
                {"minutes": minutes},
                status=429,
            )
            page["Retry-After"] = str(wait)
            return page
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
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
@require_safe
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


def _room_access(slug: str, user: User) -> tuple[Room, selectors.ReadState | None]:
    """``selectors.room_access_get``: ``Http404`` for no such room and for a
    private one ``user`` is not in, alike; ``RoomBanned`` passes through."""
    try:
        return selectors.room_access_get(slug=slug, user=user)
    except RoomHidden:
        raise Http404(f"no room {slug!r}") from None
    except ChatError as exc:
        if exc.code == NOT_FOUND:
            raise Http404(f"no room {slug!r}") from None
        raise


def banned_page(request: HttpRequest, ban: Ban, *, room: Room | None) -> HttpResponse:
    """403: the ban page, of a site-wide ban (``room`` None) or of one room's."""
    return render(request, "chat/banned.html", {"ban": ban, "room": room}, status=403)


@login_required
@require_safe
def room_detail(request: AuthenticatedRequest, slug: str) -> HttpResponse:
    try:
        room, read_state = _room_access(slug, request.user)
    except RoomBanned as exc:
        return banned_page(request, exc.ban, room=exc.room)
    name = room.title
    if room.is_direct:
        prefetch_related_objects([room], "memberships__user")
        name = _direct_partner_name(room, request.user)
    config = {
        "room": room.slug,
        "username": request.user.get_username(),
        "is_private": room.is_private,
        # A direct conversation has its two members for good.
        "can_leave": read_state is not None and not room.is_direct,
    }
    context = {"room": room, "name": name, "chat_config": config}
    return render(request, "chat/room.html", context)


# --- HTTP API -------------------------------------------------------------------


def _api_error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def _api_room(slug: str, user: User) -> Room | JsonResponse:
    """The room if ``user`` may read it, else the refusal: 404 for no such room
    and for a private one they are not in, 403 if they are banned from it."""
    try:
        return _room_access(slug, user)[0]
    except Http404 as exc:
        return _api_error(404, str(exc))
    except RoomBanned as exc:
        return _api_error(403, exc.message)


def _api_user_room(request: HttpRequest, slug: str) -> tuple[User, Room] | HttpResponse:
    """For a POST to a room's API path: its user (``_api_user``) and the room
    (``_api_room``), or the refusal of either."""
    user, refused = _api_user(request)
    if refused is not None or user is None:
        return refused or _api_error(401, "sign in")
    room = _api_room(slug, user)
    if isinstance(room, JsonResponse):
        return room
    return user, room


@csrf_exempt  # a POST is checked in _api_user: CSRF for a session, or a token
@require_http_methods(["GET", "HEAD", "POST"])
def room_members(request: HttpRequest, slug: str) -> HttpResponse:
    """/api/rooms/<slug>/members: GET lists them, POST invites one."""
    if request.method == "POST":
        return _member_invite(request, slug)
    # login_required (on _members_list) sees that the user is signed in.
    return _members_list(cast("AuthenticatedRequest", request), slug)


@login_required
def _members_list(request: AuthenticatedRequest, slug: str) -> JsonResponse:
    """The usernames of the room's members (active accounts), sorted, for the
    room page's @mention autocomplete and people list; whether the reader may
    invite."""
    room = _api_room(slug, request.user)
    if isinstance(room, JsonResponse):
        return room
    names = (
        room.memberships.filter(user__is_active=True)
        .order_by("user__username")
        .values_list("user__username", flat=True)
    )
    can_invite = selectors.user_can_invite(room=room, user=request.user)
    return JsonResponse({"members": list(names), "can_invite": can_invite})


INVITE_BODY = 'send Content-Type: application/json and {"username": "<name>"}'


def _member_invite(request: HttpRequest, slug: str) -> HttpResponse:
    """Add ``{"username": …}`` to a private room: 201 when new, 200 if already in."""
    found = _api_user_room(request, slug)
    if isinstance(found, HttpResponse):
        return found
    user, room = found
    if request.content_type != "application/json":
        return _api_error(400, INVITE_BODY)  # form data may be read already
    try:
        body = json.loads(request.body)
    except ValueError:
        return _api_error(400, INVITE_BODY)
    username = body.get("username") if isinstance(body, dict) else None
    if not isinstance(username, str) or not username:
        return _api_error(400, INVITE_BODY)
    try:
        membership, created = services.membership_invite(
            room=room, inviter=user, username=username
        )
    except ChatError as exc:
        return _api_error(403 if exc.code == FORBIDDEN else 400, exc.message)
    member = {"member": membership.user.get_username()}
    return JsonResponse(member, status=201 if created else 200)


@csrf_exempt  # checked in _api_user: CSRF for a session, or a token
@require_POST
def room_leave(request: HttpRequest, slug: str) -> HttpResponse:
    """POST /api/rooms/<slug>/leave: end one's membership of the room."""
    found = _api_user_room(request, slug)
    if isinstance(found, HttpResponse):
        return found
    user, room = found
    try:
        services.room_leave(room=room, user=user)
    except ChatError as exc:
        return _api_error(400, exc.message)
    return JsonResponse({"left": room.slug})


@require_safe
def api_me(request: HttpRequest) -> JsonResponse:
    """GET /api/me: the session's user and their site-wide ban, if any; the room
    page asks after a refused socket, to say why. Never cached."""
    body: dict[str, object] = {"user": None, "banned": None}
    user = request.user
    if user.is_authenticated:
        ban = selectors.site_ban_get(user_id=user.pk)
        body["user"] = {"id": user.pk, "username": user.get_username()}
        if ban is not None:
            body["banned"] = {
                "reason": ban.reason,
                "until": protocol.timestamp(ban.expires_at),
            }
    response = JsonResponse(body)
    response["Cache-Control"] = "no-store"
    return response


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


def _csrf_checked(request: HttpRequest) -> HttpResponse:
    """A stand-in view for running Django's CSRF check inside an API view."""
    return HttpResponse()


# Room for the multipart envelope around a file of CHAT_MAX_UPLOAD_BYTES.
UPLOAD_ENVELOPE_BYTES = 64 * 1024


def _api_user(request: HttpRequest) -> tuple[User | None, HttpResponse | None]:
    """The user of an API request: a bearer token's, or the session's (which
    must then pass the CSRF check). Answers (user, None) or (None, refusal)."""
    key = ApiToken.key_from_authorization(request.headers.get("Authorization", ""))
    if key:
        found = selectors.token_user_get(key=key)
        if found is None:
            return None, _api_error(401, "this API token is not valid")
        if found.use_stale:
            services.api_token_use_note(token_id=found.token_id)
        return found.user, None
    if not request.user.is_authenticated:
        return None, _api_error(401, "sign in, or send Authorization: Bearer <token>")
    refused = CsrfViewMiddleware(_csrf_checked).process_view(
        request, _csrf_checked, (), {}
    )
    if refused is not None:
        return None, _api_error(403, "the CSRF token is missing or wrong")
    if selectors.user_is_site_banned(user_id=request.user.pk):
        return None, _api_error(403, "you are banned")
    return request.user, None


@csrf_exempt
@require_POST
def api_uploads(request: HttpRequest) -> HttpResponse:
    """POST /api/uploads: store the multipart field ``file``; 201 with its
    attachment object, 413 over ``CHAT_MAX_UPLOAD_BYTES``."""
    limit = settings.CHAT_MAX_UPLOAD_BYTES
    too_large = _api_error(413, f"the file is over {limit} bytes")
    if _declared_length(request) > limit + UPLOAD_ENVELOPE_BYTES:
        return too_large  # refused before the body is read
    user, refused = _api_user(request)
    if refused is not None or user is None:
        return refused or _api_error(401, "sign in")
    file = request.FILES.get("file")
    if file is None:
        return _api_error(400, "send the file as the multipart field 'file'")
    try:
        upload = services.upload_create(owner=user, file=file)
    except ChatError:
        return too_large
    return JsonResponse(protocol_attachment(upload), status=201)


def protocol_attachment(upload: Upload) -> dict[str, object]:
    return {
        "id": upload.pk,
        "name": upload.name,
        "size": upload.size,
        "content_type": upload.content_type,
        "url": services.upload_url(upload),
    }


@require_safe
def upload_file(request: HttpRequest, upload_id: int, name: str) -> HttpResponse:
    """GET an attachment: to users who may read its message's room (before it
    is attached, its owner). 404 for unknown ones, those of a message deleted
    for everyone and those of a private room to its outsiders (as for the room
    itself); 403 to everyone else: nobody signed in, the room's banned users."""
    upload = (
        Upload.objects.select_related("message__room")
        .filter(pk=upload_id, name=name)
        .first()
    )
    if upload is None:
        raise Http404("no such file")
    user, refused = _reader(request)
    if refused is not None:
        return refused
    message = upload.message
    if message is None:
        if upload.owner_id != user.pk:
            return _api_error(403, "you may not read this file")
    elif message.deleted_at is not None:
        raise Http404("no such file")
    else:
        try:
            _room_access(message.room.slug, user)
        except Http404:
            raise Http404("no such file") from None
        except RoomBanned:
            return _api_error(403, "you may not read this file")
    return _file_response(upload)


def _reader(request: HttpRequest) -> tuple[Any, HttpResponse | None]:
    """Who is reading: the session's user or a bearer token's; 403 for nobody."""
    key = ApiToken.key_from_authorization(request.headers.get("Authorization", ""))
    if key:
        found = selectors.token_user_get(key=key)
        if found is not None:
            return found.user, None
    elif request.user.is_authenticated and not selectors.user_is_site_banned(
        user_id=request.user.pk
    ):
        return request.user, None
    return None, _api_error(403, "sign in to read this file")


def _file_response(upload: Upload) -> HttpResponse:
    accel = settings.CHAT_ACCEL_REDIRECT
    if accel:
        response = HttpResponse(content_type=upload.content_type)
        response["X-Accel-Redirect"] = accel + upload.file.name
    else:
        with upload.file.open("rb") as file:
            response = HttpResponse(file.read(), content_type=upload.content_type)
    inline = upload.content_type in uploads.INLINE_IMAGES
    disposition = "inline" if inline else "attachment"
    response["Content-Disposition"] = (
        f"{disposition}; filename*=UTF-8''{quote(upload.name)}"
    )
    # Never run as a page of this site, whatever the bytes hold.
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["Cache-Control"] = "private, max-age=3600"
    return response


def _push_to(target: str, value: str, event: str, data: object) -> int | Awaitable[int]:
    # A sync view: push.* run to completion and return the count itself.
    if target == "all":
        return push.to_everyone(event, data)
    if target == "user":
        return push.to_user(selectors.user_get_active(username=value), event, data)
    if target == "room":
        return push.to_room(value, event, data)
    return push.to_connection(value, event, data)


# --- Site-wide: error pages, request checks, the CSP, sign-in throttling -----


def bad_request(request: HttpRequest, exception: Exception | None) -> HttpResponse:
    """``handler400``: the site's page, and no CSRF check.

    Django's own handler runs one, which reads the form data again: for a body it
    could not decode that raises again, and the 400 becomes a 500.
    """
    return HttpResponseBadRequest(loader.render_to_string("400.html", request=request))


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500``: the site's page, rendered from nothing that could fail again
    (no request, so no context processors: the site's name is given here)."""
    context = {"chat_site_name": settings.CHAT_SITE_NAME}
    return HttpResponseServerError(loader.render_to_string("500.html", context))


@require_safe
def favicon(request: HttpRequest) -> HttpResponse:
    """/favicon.ico, which browsers ask for unbidden: a redirect to the site's
    icon (302, not 301: its static URL may change)."""
    return redirect(static("chat/favicon.svg"))


def nul_refused(get_response: GetResponse) -> GetResponse:
    """Middleware: a NUL in the path, query, form data, cookies or headers is a 400.

    No text of this site holds one, and PostgreSQL refuses NUL in every text
    column: a lookup or a write with one (an admin filter, a session key from a
    cookie, axes' record of a User-Agent) would fail there as a 500.
    """

    def middleware(request: HttpRequest) -> HttpResponseBase:
        if _has_nul(request):
            return bad_request(request, None)
        return get_response(request)

    return middleware


def _declared_length(request: HttpRequest) -> int:
    try:
        return int(request.headers.get("Content-Length") or 0)
    except ValueError:
        return 0


def _has_nul(request: HttpRequest) -> bool:
    texts = [request.path_info, *request.COOKIES, *request.COOKIES.values()]
    texts += [v for k, v in request.META.items() if k.startswith("HTTP_")]
    forms = [request.GET]
    if request.method == "POST":
        if request.content_type != "multipart/form-data":
            # Read the body whole first: parsed from the stream, form data would
            # leave no body for a view that reads it (the push API).
            _ = request.body
            forms.append(request.POST)
        elif _declared_length(request) <= (
            settings.CHAT_MAX_UPLOAD_BYTES + UPLOAD_ENVELOPE_BYTES
        ):
            # An upload: parsed from the stream, its files spooled to disk
            # (reading it whole would hit DATA_UPLOAD_MAX_MEMORY_SIZE, 2.5 MB).
            # A larger one is left unread for the view to refuse with 413.
            forms.append(request.POST)
    for data in forms:  # POST: form fields only, files are not text
        for key, values in data.lists():
            texts += [key, *values]
    return any("\x00" in text for text in texts)


# What a user banned from the whole site may still reach: signing in and out,
# why they are refused (api/me), the probes, and the admin, where staff lift bans.
BAN_EXEMPT_VIEWS = {
    ("", "login"),
    ("", "logout"),
    ("chat", "api_me"),
    ("chat", "healthz"),
    ("chat", "readyz"),
    ("chat", "metrics"),
}


class SiteBanMiddleware:
    """Middleware: a user banned from the whole site gets 403 on the site's pages
    (the ban page) and its API (``{"error": "banned: <reason>"}``), as the socket
    handshake refuses them. One query per request of a signed-in user.

    After ``AuthenticationMiddleware``. It acts in ``process_view``, once the URL
    has resolved: exemptions go by URL name, wherever chat's URLs are mounted.
    """

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        return self.get_response(request)

    def process_view(
        self,
        request: HttpRequest,
        view_func: Callable[..., Any],
        view_args: tuple[Any, ...],
        view_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        # The exemptions first: deciding them reads no session, user or ban.
        if _ban_exempt(request) or not request.user.is_authenticated:
            return None
        ban = selectors.site_ban_get(user_id=request.user.pk)
        if ban is None:
            return None
        if _is_api(request):
            return _api_error(403, f"banned: {ban.reason}")
        return banned_page(request, ban, room=None)


def _ban_exempt(request: HttpRequest) -> bool:
    """Whether a site-wide ban leaves the request's view open (by URL name)."""
    match = request.resolver_match
    if match is None or request.path.startswith(settings.STATIC_URL):
        return True
    if "admin" in match.app_names:
        return True
    return (match.app_name, match.url_name) in BAN_EXEMPT_VIEWS


def _is_api(request: HttpRequest) -> bool:
    """Whether the request's URL pattern is of the HTTP API (``…api/…``)."""
    route = request.resolver_match.route if request.resolver_match else ""
    return "/api/" in f"/{route}"


class SiteCSPMiddleware(CSPMiddleware):
    """django-csp's middleware, with this site's socket origin added to connect-src.

    CSP3 browsers let 'self' match ws:/wss: on this host; older ones need it named.
    """

    def get_policy_parts(
        self,
        request: HttpRequest,
        response: HttpResponseBase,
        report_only: bool = False,
    ) -> PolicyParts:
        parts = super().get_policy_parts(request, response, report_only)
        origin = None if report_only else _socket_origin(request)
        if origin is not None:
            update = dict(parts.update or {})
            update["connect-src"] = [*update.get("connect-src", []), origin]
            parts.update = update
        return parts


def _socket_origin(request: HttpRequest) -> str | None:
    """``wss://host[:port]`` of the page's socket (``ws://`` over plain HTTP)."""
    try:
        host = request.get_host()
    except DisallowedHost:
        return None  # the answer is a 400
    if host.startswith("["):
        return None  # CSP names no IPv6 literal: 'self' alone must do there
    return f"{'wss' if request.is_secure() else 'ws'}://{host}"


def sign_in_locked_out(
    request: HttpRequest,
    response: HttpResponse | None = None,
    credentials: dict[str, Any] | None = None,
) -> HttpResponse:
    """The answer to a locked-out sign-in (``AXES_LOCKOUT_CALLABLE``): when to retry."""
    cool_off: timedelta | None = settings.AXES_COOLOFF_TIME
    context: dict[str, Any] = {"failure_limit": settings.AXES_FAILURE_LIMIT}
    if cool_off is not None:
        # Every attempt, this one too, restarts the wait (axes' default).
        attempted = getattr(request, "axes_attempt_time", None) or timezone.now()
        context["minutes"] = int(cool_off.total_seconds() // 60)
        context["until"] = attempted + cool_off
    page = render(request, "registration/locked_out.html", context, status=429)
    if cool_off is not None:
        page["Retry-After"] = str(int(cool_off.total_seconds()))
    return page


def client_ip_address(request: HttpRequest) -> str | None:
    """The address sign-in throttling counts (``AXES_CLIENT_IP_CALLABLE``).

    The peer's, or behind the TLS proxy the last address of ``X-Forwarded-For``:
    the one the proxy appended. Those before it are whatever the client sent.
    """
    peer = request.META.get("REMOTE_ADDR") or None
    if not settings.CHAT_CLIENT_IP_FROM_PROXY:
        return peer
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "").rsplit(",", 1)[-1]
    try:
        address = ipaddress.ip_address(forwarded.strip())
    except ValueError:
        return peer
    # A zone (fe80::1%eth0) is no address PostgreSQL's inet column takes.
    if getattr(address, "scope_id", None):
        return peer
    return str(address)
