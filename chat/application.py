"""The ``/ws/`` handshake in one step: path, ``Origin``, identity, site ban.

Channels' stack for this (OriginValidator, CookieMiddleware, SessionMiddleware,
AuthMiddleware, a token middleware, URLRouter) nests six applications, and each
keeps its own copy of the scope (headers, cookies, the session object) in a
suspended frame for as long as the socket lives: about 6 KiB per idle socket.
Here one coroutine checks everything in one trip to the database thread (one
query for a token), then hands the consumer a scope holding only what it reads.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib import auth
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.exceptions import SuspiciousFileOperation
from django.http import Http404, HttpRequest
from django.http.cookie import parse_cookie
from django.http.request import validate_host
from django.utils.module_loading import import_string

from chat import protocol, selectors, services
from chat.models import ApiToken

logger = logging.getLogger(__name__)

WEBSOCKET_PATH = "/ws/"
# The handshake could not ask the database who the client is.
UNAVAILABLE = "unavailable"
UNAVAILABLE_REASON = "database unavailable: try again"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[Any]]


def header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope.get("headers", []) if key == name]


def token_from_scope(scope: Scope) -> str | None:
    """The token of ``Authorization: Bearer <token>``, else of ``?token=``.

    None when neither is there; "" for a malformed ``Authorization`` header.
    """
    for value in header_values(scope, b"authorization"):
        return ApiToken.key_from_authorization(value.decode("latin-1"))
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[0] if values else None


def session_key_from_scope(scope: Scope) -> str | None:
    cookies = b"; ".join(header_values(scope, b"cookie")).decode("latin-1")
    return parse_cookie(cookies).get(settings.SESSION_COOKIE_NAME) or None


Origin = tuple[str, str, int]  # scheme, host, port
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(text: str) -> Origin | None:
    """``(scheme, host, port)`` of an http(s) origin; None for anything else."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme]


def _this_site(scope: Scope) -> Origin | None:
    """The origin of the page a same-site browser socket comes from: our Host."""
    hosts = header_values(scope, b"host")
    if not hosts:
        return None
    secure = settings.SECURE_PROXY_SSL_HEADER or scope.get("scheme") == "wss"
    site = origin_of(f"{'https' if secure else 'http'}://{hosts[0].decode('latin-1')}")
    if site is None or not validate_host(site[1], settings.ALLOWED_HOSTS):
        return None
    return site


def origin_allowed(scope: Scope, *, by_cookie: bool) -> bool:
    """A browser's ``Origin`` must be ours: the same scheme, host and port.

    Ours means one of ``CHAT_ALLOWED_ORIGINS`` when set, else this site as the
    handshake's ``Host`` names it. Browsers always send ``Origin``; a handshake
    without one may only authenticate with a token, since a cookie would let any
    page a user visits open a socket as them (cross-site WebSocket hijacking).
    """
    origins = header_values(scope, b"origin")
    if not origins:
        return not by_cookie
    origin = origin_of(origins[0].decode("latin-1"))  # "null" is no origin
    if origin is None:
        return False
    if settings.CHAT_ALLOWED_ORIGINS:
        return origin in {origin_of(o) for o in settings.CHAT_ALLOWED_ORIGINS}
    return origin == _this_site(scope)


def identify(
    *, token_key: str | None, session_key: str | None
) -> tuple[Any, int | None, bool]:
    """``(user, token_id, use_stale)`` of a handshake's credentials.

    ``(None, None, False)`` for nobody. A token, when given, decides (a bad one
    means nobody, whatever the cookie). An inactive or site-banned user is
    nobody too. ``use_stale``: the token's last use is worth noting (the caller
    does, with ``services.api_token_use_soon``); reading is all this does.
    """
    if token_key is not None:
        found = selectors.token_user_get(key=token_key) if token_key else None
        if found is None:
            return None, None, False
        return found.user, found.token_id, found.use_stale
    if session_key is None:
        return None, None, False
    session_store = import_string(f"{settings.SESSION_ENGINE}.SessionStore")
    request = HttpRequest()
    request.session = session_store(session_key)
    user = auth.get_user(request)
    if not user.is_authenticated or not user.is_active:
        return None, None, False
    if selectors.user_is_site_banned(user_id=user.pk):
        return None, None, False
    return user, None, False


async def handshake(scope: Scope) -> Scope | str | None:
    """The consumer's scope for a socket we accept, or None to refuse it.

    ``UNAVAILABLE`` when the database is out of reach: the client is not
    refused, only asked to come back.
    """
    token_key = token_from_scope(scope)
    if scope.get("path") != WEBSOCKET_PATH:
        return None
    if not origin_allowed(scope, by_cookie=token_key is None):
        return None
    session_key = session_key_from_scope(scope)
    try:
        user, token_id, use_stale = await database_sync_to_async(identify)(
            token_key=token_key, session_key=session_key
        )
    except services.DATABASE_OUTAGE_ERRORS as exc:
        # One line, no traceback: a reconnecting crowd would flood the log.
        logger.warning("handshake: database unavailable: %s", str(exc).strip())
        return UNAVAILABLE
    if user is None:
        return None
    if use_stale and token_id is not None:
        services.api_token_use_soon(token_id=token_id)
    return {
        "type": "websocket",
        "path": scope["path"],
        "query_string": scope.get("query_string", b""),
        "subprotocols": scope.get("subprotocols", []),
        "user": user,
        "token_id": token_id,
        # Which session opened it, so signing out of that one session closes it.
        "session": (
            services.session_fingerprint(session_key)
            if token_id is None and session_key
            else None
        ),
    }


async def refuse(receive: Receive, send: Send) -> None:
    """Close before accepting: the client's handshake gets HTTP 403."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


async def try_again_later(receive: Receive, send: Send) -> None:
    """Accept and close at once with 1013 and a reason the client can read."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.accept"})
        await send(
            {
                "type": "websocket.close",
                "code": protocol.CLOSE_TRY_AGAIN,
                "reason": UNAVAILABLE_REASON,
            }
        )


class ChatApplication:
    """HTTP to Django, ``/ws/`` through the handshake to the chat consumer.

    This frame stays suspended for a socket's whole life: it holds the small
    scope the handshake made, never the server's.
    """

    def __init__(self, *, http: ASGIApp, websocket: ASGIApp) -> None:
        self.http = http
        self.websocket = websocket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            accepted = await handshake(scope)
            del scope  # this frame lives as long as the socket: not the server's
            if accepted is None:
                return await refuse(receive, send)
            if isinstance(accepted, str):  # UNAVAILABLE
                return await try_again_later(receive, send)
            return await self.websocket(accepted, receive, send)
        if kind == "lifespan":
            return await self.lifespan(receive, send)
        return await self.http(scope, receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


class StaticFiles(ASGIStaticFilesHandler):
    """Django's static files handler, as daphne serves ``/static/``.

    A path that climbs out of the static roots (``/static/%2e%2e/…``) makes the
    finders raise ``SuspiciousFileOperation``, which Django's handler lets
    through as a 500: it is simply no file of ours, a 404.
    """

    def serve(self, request: HttpRequest) -> Any:
        try:
            return super().serve(request)
        except SuspiciousFileOperation:
            raise Http404("no such static file") from None
